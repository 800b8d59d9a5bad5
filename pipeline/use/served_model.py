"""The file MLflow logs as the served model's code ("models from code"): loading a logged model runs this file instead
of unpickling an object, so a logged model holds no pickle (its weights load with `weights_only`,
pipeline/use/serve.py)."""
from mlflow.models import set_model

from pipeline.use.serve import ServedModel

set_model(ServedModel())
