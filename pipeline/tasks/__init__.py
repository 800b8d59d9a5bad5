"""The tasks. The contract every task implements is in base.py; the registry (name -> task) in registry.py; the
config schemas by name, light enough for `pipeline.config` to import, in schemas.py."""
