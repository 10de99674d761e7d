"""Run by a job script under sbatch: a workflow on the job's workers (Runtime(cluster="slurm"))."""

import asyncio
import json
import os
import sys

import async_wf


def where(i: int) -> dict[str, object]:
    return {"i": i, "square": i * i, "job": os.environ.get("SLURM_JOB_ID"),
            "step": os.environ.get("SLURM_STEP_ID"), "pid": os.getpid()}


async def main() -> None:
    # under "async-wf run --slurm" the plain Runtime() gets cluster="slurm"
    mode = os.environ.get("INSIDE_MODE", "cluster")
    if mode == "broken":  # the nodes have no such interpreter: the start must say so
        try:
            async with async_wf.Runtime(cluster=async_wf.SlurmJob(python="/nonexistent/py")):
                pass
        except async_wf.AllocationError as exc:
            print(json.dumps({"error": str(exc)}))
        return
    rt = async_wf.Runtime() if mode == "plain" else async_wf.Runtime(
        cluster=async_wf.SlurmJob(per="task") if mode == "task" else "slurm")
    async with rt:
        out = await asyncio.gather(*[rt.submit(where, i) for i in range(8)])
        stats = rt.statistics()
        print(json.dumps({"results": out, "app_pid": os.getpid(),
                          "workers": stats["worker_resources"],
                          "allocations": stats["allocations"]}))


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.flush()
