"""The tasks. The contract every task implements is in base.py; the registry (name -> schema, primary metric and the
implementation, imported when asked for) in registry.py, light enough for `pipeline.config` to read task files with."""
