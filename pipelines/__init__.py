"""ctsynth on Ray: parallel stages over the `ctsynth_ray` library, with MLflow tracking where runs are trained.

Imported as ``ctsynth_ray.pipelines`` (the folder is mapped under the library's namespace at install).
"""
