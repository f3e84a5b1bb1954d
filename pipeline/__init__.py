"""An MLflow-managed pipeline that fine-tunes a Keras ResNet50 image classifier.

Steps (each a function taking a config from pipeline.config and returning a small result):
pipeline.prepare.prepare, pipeline.train.train, pipeline.evaluate.evaluate and
pipeline.workflow.main, which chains them. pipeline.cli exposes them as `python -m pipeline`.
"""
