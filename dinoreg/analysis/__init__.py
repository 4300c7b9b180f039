"""The registers paper's diagnostics: one module per `dinoreg analyze` tool (each declares ``TOOLS``) and their shared
inputs and outputs (:mod:`dinoreg.analysis.common`). FLOP counting, ``analyze flops``'s included, is in
:mod:`dinoreg.tools.flops`."""
