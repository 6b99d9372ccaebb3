"""The `ctsynth` command line (imported as ``ctsynth_ray.cli``): it parses, then calls the pipelines."""
