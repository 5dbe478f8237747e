"""Multi-process runs on JAX's multi-controller runtime (``jax.distributed``).

Every process runs the same command. Process 0 creates (or checks, with ``--resume``)
the store; after a barrier each process computes its own chunks on its own devices
(chunk ``c`` belongs to process ``c % P``) and writes them into the shared store (a
shared file system or an fsspec URL); after a second barrier process 0 records the
run and consolidates the metadata. Processes never exchange results, so a process that
dies loses only its unfinished chunks, which ``--resume`` recomputes.

Launch (two machines, or two processes on one)::

    convlens run vgg16 --weights w.h5 --data tfds:imagenette:validation --out s3://bucket/run.zarr \\
        --num-processes 2 --process-id 0 --coordinator host0:1234      # on host0
    ... --num-processes 2 --process-id 1 --coordinator host0:1234        # on host1

Under Slurm (or another launcher JAX recognises) ``--num-processes`` and friends can be
left out: ``srun -n 4 convlens run ... --distributed-auto`` reads them from the
environment, as ``jax.distributed.initialize()`` does.
"""

from __future__ import annotations

from convlens.engine.runner import Process, Run, RunRequest, Summary
from convlens.errors import ConvlensError

_BARRIER_TIMEOUT_MS = 24 * 3600 * 1000


def initialize(num_processes: int | None = None, process_id: int | None = None, coordinator: str | None = None,
               auto: bool = False) -> Process:
    """Joins a multi-process run, before anything else touches JAX; a single process
    returns ``Process()`` without initialising anything."""
    import jax

    if auto:
        jax.distributed.initialize()
        return Process.from_jax()
    if not num_processes or num_processes == 1:
        if process_id not in (None, 0) or coordinator:
            raise ConvlensError("--process-id / --coordinator need --num-processes > 1")
        return Process()
    if process_id is None or coordinator is None:
        raise ConvlensError("a multi-process run needs --num-processes, --process-id and --coordinator HOST:PORT "
                            "(or --distributed-auto under Slurm)")
    if not 0 <= process_id < num_processes:
        raise ConvlensError(f"--process-id {process_id} is not in 0..{num_processes - 1}")
    try:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    except Exception as e:  # noqa: BLE001 - connection problems come in many types
        raise ConvlensError(f"cannot join the run at {coordinator}: {e}") from None
    return Process.from_jax()


def _agree(name: str, ok: bool) -> bool:
    """A barrier that also tells everyone whether process 0 succeeded."""
    import numpy as np
    from jax.experimental import multihost_utils

    flag = multihost_utils.broadcast_one_to_all(np.int32(1 if ok else 0))
    multihost_utils.sync_global_devices(name)
    return bool(flag)


def run(model, params, source, request: RunRequest, process: Process, note=None) -> Summary:
    """`runner.Run` for one process of a (possibly) multi-process run."""
    r = Run(model, params, source, request, process=process, note=note)
    if process.count == 1:
        return r.execute()
    specs = r.output_specs()
    error = None
    try:
        if process.index == 0:  # process 0 owns the store (its lock) for the whole run
            try:
                r.acquire()
                r.prepare_store(specs)
            except ConvlensError as e:
                error = e
        if not _agree("convlens-store-ready", error is None):
            if error is not None:
                raise error
            raise ConvlensError("process 0 could not prepare the store (see its error); nothing was run")
        summary = r.execute(prepare=False, finalize=False)
        _agree("convlens-chunks-done", True)
        if process.index == 0:
            r.finalize_store(summary)
        return summary
    finally:
        r.release()
