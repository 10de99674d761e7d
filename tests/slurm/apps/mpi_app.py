"""Run with mpiexec (or srun --mpi=pmi2) inside an allocation: MPI mode of async_wf."""

import asyncio
import json
import os

import async_wf


def where(i: int) -> dict[str, object]:
    return {"i": i, "square": i * i, "job": os.environ.get("SLURM_JOB_ID"),
            "step": os.environ.get("SLURM_STEP_ID"), "rank": os.environ.get("PMI_RANK")}


async def main() -> None:
    async with async_wf.Runtime() as rt:
        out = await asyncio.gather(*[rt.submit(where, i) for i in range(6)])
        print(json.dumps({"results": out}))


async_wf.run(main())
