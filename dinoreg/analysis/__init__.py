"""The registers paper's diagnostics: one module per `dinoreg analyze` tool (each declares ``TOOLS``), their shared
inputs and outputs (:mod:`dinoreg.analysis.common`), and FLOP counting (:mod:`dinoreg.analysis.flops`)."""
