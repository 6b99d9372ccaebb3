"""ctsynth on Ray: parallel stages over the `ctsynth_ray` library, with MLflow tracking where runs are trained.

Imported as ``ctsynth_ray.pipelines`` (the folder is mapped under the library's namespace at install).
Importing it sets the loopback-only and no-telemetry defaults before anything imports ray or mlflow
(see :mod:`ctsynth_ray.pipelines.runtime`); values the user has set are kept.
"""

from ctsynth_ray.pipelines.runtime import set_local_defaults

set_local_defaults()
