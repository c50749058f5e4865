"""Ray Train, MLflow tracking and job submission: where the model meets the cluster."""
