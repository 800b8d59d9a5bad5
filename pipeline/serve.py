"""Where models logged before the package had its stage folders find their served model: their code file (MLflow's
"models from code", copied into each logged model) runs `from pipeline.serve import ServedModel`. The served model
itself is pipeline/use/serve.py."""
from pipeline.use.serve import ServedModel

__all__ = ["ServedModel"]
