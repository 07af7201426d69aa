"""Dagster definitions for dattr: assets, partitions, resources, sensors and checks.

Thin by design: every computation lives in `dattr_core`; assets call it and record metadata.
"""
