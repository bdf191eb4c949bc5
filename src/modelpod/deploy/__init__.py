"""Deploy pods to Kubernetes: plain objects rendered by a pure function, applied by server-side apply.

``spec`` holds what a deployment is (checked once), ``kubernetes`` and ``objects`` render it into
dicts, ``output`` writes them as deterministic YAML, ``apply`` (the ``kubernetes`` extra) sends them
to a cluster. Nothing here is needed by a serving image.
"""
