"""Mesh construction, partition rules, multi-process start-up."""

from jaxcomp.parallel.mesh import (
    AXES,
    initialize_distributed,
    make_mesh,
    partition_specs,
    put_global,
)

__all__ = ["AXES", "initialize_distributed", "make_mesh", "partition_specs", "put_global"]
