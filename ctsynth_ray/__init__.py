"""ctsynth: synthetic thoracic CT volumes with lung-nodule masks, and measures of their worth.

This package is the science: pure numpy / torch / nibabel / pydicom / scipy / pyarrow. It never
imports ray, mlflow or typer; `ctsynth_ray.pipelines` puts it on Ray and `ctsynth_ray.cli` is the
command line (both live in the repository's top-level `pipelines/` and `cli/` folders).
"""

__version__ = "0.1.0"
