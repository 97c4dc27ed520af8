"""Deploy open chat LLMs behind an HTTP API from JupyterLab."""
