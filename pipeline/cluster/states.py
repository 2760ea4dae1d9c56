"""The one home of the names camsweep's cluster code shares: files a run or a sweep leaves,
and SLURM's job states as ``squeue``/``sacct`` spell them, grouped by what they mean for a
sweep job."""

from __future__ import annotations

STATUS_FILE = "camsweep.json"  # per job (shards: camsweep.shard-<i>-of-<N>.json), by pipeline.cli
SHARD_STATUS_GLOB = "camsweep.shard-*-of-*.json"
JOBS_FILE = "slurm_jobs.json"  # per SLURM sweep: ids, states and outcomes of its jobs
IDENTITY_FILE = "camsweep.identity.json"  # per run or sweep folder: the command that made it
RUN_LOG = "run.log"  # Hydra's log of a job, in its folder

# SLURM states of a job that is still on the cluster, by what it is doing.
SLURM_RUNNING = ("RUNNING", "COMPLETING", "CONFIGURING", "STAGE_OUT", "SIGNALING", "RESIZING")
SLURM_WAITING = ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "PREEMPTED",
                 "SUSPENDED")
LIVE_STATES = SLURM_RUNNING + SLURM_WAITING
# Final SLURM states that are not success, and the sweep state each one means.
SLURM_ENDED = {"CANCELLED": "cancelled", "TIMEOUT": "timeout", "DEADLINE": "timeout",
               "FAILED": "failed", "OUT_OF_MEMORY": "failed", "NODE_FAIL": "failed",
               "BOOT_FAIL": "failed"}
# States SLURM records for an earlier run of a job it requeued (sacct -D).
SLURM_REQUEUED = ("REQUEUED", "PREEMPTED", "REQUEUE_HOLD", "REQUEUE_FED")

# States of a sweep job, in the order tables count them.
JOB_STATES = ("done", "running", "evaluating", "pending", "incomplete", "failed", "timeout",
              "cancelled", "missing")

# What submitit writes when a job has used up its requeues after time limits.
OUT_OF_TIMEOUTS = "timed-out too many times"
# What the sweep table says about it.
RAISE_LIMITS = "raise hydra.launcher.timeout_min or max_num_timeout"
OUT_OF_TIMEOUTS_REASON = f"time limit reached after every requeue (max_num_timeout): {RAISE_LIMITS}"
# What it says when SLURM ended the job at its limit before submitit could say why (its
# handler came too late to requeue, or the job was slow to stop after it).
TIME_LIMIT_REASON = f"SLURM: time limit reached: {RAISE_LIMITS}"
