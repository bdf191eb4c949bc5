"""Daemonless, reproducible OCI images of pods, and pods as OCI artifacts (see builder, artifact)."""
