"""Shared test setup. Having a conftest here puts tests/ on sys.path, so every test module can import
``launch_helpers`` (the tiny recipe, free ports and a clean environment for subprocesses)."""
