"""Whether this process is one rank of a launcher's job (mpiexec, mpirun, srun), from the
environment alone: no MPI library is loaded, so the entry point can ask before any import."""
from __future__ import annotations

import os

# What launchers put in each rank's environment as the job's size (hydra/MPICH, Open MPI, Slurm,
# PMIx); a library that does not match the launcher silently starts K one-rank jobs instead.
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "SLURM_NTASKS")


def launcher_size() -> tuple[str, int] | None:
    """(variable, size) of the launcher that started this process, or None outside one."""
    for name in LAUNCHER_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return name, int(value)
    return None
