"""`athanor submit` and `athanor jobs`: the pipeline as a Ray job, through the Jobs API that `ray job submit` uses.

The job ships the project folder as its `working_dir` (code and configs; never data, outputs, virtualenvs, git or
caches) and runs `python -m athanor.cluster.cli run CONFIG --set ...` on the head node, where Ray sets RAY_ADDRESS so
the driver joins the cluster. Dependencies come from the nodes' image (infra/docker: CUDA torch, flash-attn and the
project's pins), because building torch into a per-job virtualenv on every node costs minutes and gigabytes;
`--pip` adds pyproject's dependencies to the runtime_env for clusters on a bare Ray image. Environment variables
(tracking URI, region) travel only when named with `--env NAME`, from the submitting shell, never from files; a
secret never travels at all (`secret_names`): a job's runtime_env is in its spec, which the dashboard and Ray's
state API show to whoever reaches the head, so the nodes hold their own credentials (a Kubernetes Secret, the
environment `ray start` ran in) or act with a cloud role.
"""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import sys
import time
from pathlib import Path

from athanor.config import load_config
from athanor.console import verbose

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore patterns relative to the working_dir (Ray also honours the project's .gitignore on top of these). No
# trailing slashes: Ray matches a folder's own path without one, so "/data/" would still walk (not ship) all of data/.
EXCLUDES = ["/data", "/runs", "/outputs", "/mlruns", "/mlartifacts", "/.venv", "/.git", "/build", "/dist", "/.whl",
            "/bench/.venv-*", "__pycache__", "*.pyc", "*.egg-info", ".pytest_cache", ".ruff_cache", ".mypy_cache",
            ".ipynb_checkpoints", "*.db"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# `athanor jobs stop`: Ray's job supervisor sends the driver SIGTERM and SIGKILLs it after RAY_JOB_STOP_WAIT_TIME_S
# (3 s by default). Training needs longer to finish its step and write a checkpoint (athanor.cluster.stop).
STOP_WAIT_ENV, STOP_WAIT_S = "RAY_JOB_STOP_WAIT_TIME_S", 300
STAGES = ("run", "curate", "tokenize", "train")


class SubmitError(Exception):
    """A submission or job query that cannot go on; the message is the whole story (the CLI exits 2)."""


ADDRESS_ENV = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")  # what `ray job` reads, in its order


def address_or_default(address: str | None) -> str:
    return address or next((os.environ[v] for v in ADDRESS_ENV if os.environ.get(v)), DEFAULT_ADDRESS)


def client(address: str | None):
    """A JobSubmissionClient, or one clear line when nothing answers at the address."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    address = address_or_default(address)
    saved = {v: os.environ.pop(v) for v in ADDRESS_ENV if v in os.environ}  # Ray lets them override `address`
    try:
        return JobSubmissionClient(address)
    except AuthenticationError:
        raise SubmitError(f"the Ray job server at {address} wants a token: export RAY_AUTH_MODE=token and "
                          "RAY_AUTH_TOKEN (from `ray get-auth-token` on the head)") from None
    except (ConnectionError, ValueError) as err:
        raise SubmitError(f"cannot reach the Ray job server at {address} ({err}); is the head up and its "
                          "dashboard port (8265) forwarded to this machine?") from None
    finally:
        os.environ.update(saved)


# A name is a secret's when one of its words (split at anything not a letter or digit) is one of SECRET_WORDS, or it
# contains one of SECRET_PARTS anywhere: AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, AWS_SESSION_TOKEN, HF_TOKEN,
# MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_PASSWORD, WANDB_API_KEY, GOOGLE_APPLICATION_CREDENTIALS, DB_PASS. Not:
# MLFLOW_TRACKING_URI, MLFLOW_TRACKING_USERNAME, AWS_REGION, AWS_DEFAULT_REGION, TOKENIZERS_PARALLELISM.
SECRET_WORDS = {"KEY", "APIKEY", "TOKEN", "PASS", "PWD"}
SECRET_PARTS = ("SECRET", "PASSWORD", "PASSWD", "CREDENTIAL", "PRIVATE")
NOT_SECRET = {"PWD"}  # the shell's working directory


def secret_names(names: list[str]) -> list[str]:
    """The names among `names` that hold credentials, by their spelling (see SECRET_WORDS)."""
    def secret(name: str) -> bool:
        upper = name.upper()
        words = re.split(r"[^A-Z0-9]+", upper)
        return upper not in NOT_SECRET and (any(w in SECRET_WORDS for w in words) or
                                            any(p in upper for p in SECRET_PARTS))
    return [n for n in names if secret(n)]


def check_env_names(env_names: list[str]) -> None:
    """Refuse to forward secrets: they would sit in the job's spec for anyone who can open the dashboard."""
    if found := secret_names(env_names):
        raise SubmitError(f"--env {', '.join(found)}: secrets never travel with a job (its runtime_env is shown by the "
                          "Ray dashboard and state API); give the cluster's nodes their own: a Kubernetes Secret in "
                          "the pods' env (infra/kuberay), the environment `ray start` runs in, or a cloud role")


def project_dependencies(project: Path) -> list[str]:
    """pyproject's [project] dependencies for a runtime_env pip list, less Ray itself (the cluster's own Ray runs
    the job; Ray's pip plugin layers the rest over it)."""
    import tomllib

    deps = tomllib.loads((project / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if re.split(r"[\[<>=!~; ]", d, maxsplit=1)[0].strip().lower() != "ray"]


def build_runtime_env(project: Path, env_names: list[str], pip: bool) -> dict:
    """working_dir without data or outputs; named environment variables only (and the stop grace period, unless
    named); pip deps on request."""
    check_env_names(env_names)
    missing = [n for n in env_names if n not in os.environ]
    if missing:
        raise SubmitError(f"--env {', '.join(missing)}: not set in this shell, so there is nothing to forward")
    runtime_env: dict = {"working_dir": str(project), "excludes": list(EXCLUDES)}
    runtime_env["env_vars"] = {STOP_WAIT_ENV: str(STOP_WAIT_S), **{n: os.environ[n] for n in env_names}}
    if pip:
        runtime_env["pip"] = project_dependencies(project)
    return runtime_env


def build_entrypoint(config: str, overrides: list[str], stage: str = "run", force: bool = False,
                     verbose: bool = False) -> str:
    """The job's command line: the same stage and overrides, and --verbose when `athanor submit` had it."""
    args = [stage, config, *[a for o in overrides for a in ("--set", o)]] + (["--force"] if force else [])
    return "python -m athanor.cluster.cli " + shlex.join(args + (["--verbose"] if verbose else []))


def is_checkout(folder: Path) -> bool:
    return (folder / "pyproject.toml").is_file() and (folder / "cluster" / "cli.py").is_file()


def _project_and_config(config: str, working_dir: str | None, pip: bool = False) -> tuple[Path, str]:
    """(the job's working_dir, the config's path inside it). From a source checkout the project folder travels, so
    the job runs this code; from an installed athanor (a wheel, no checkout) only the config's folder travels and the
    job runs the athanor installed on the cluster (the image's)."""
    project = Path(working_dir or ".").resolve()
    if not is_checkout(project):
        if working_dir:
            raise SubmitError(f"--working-dir {project} is not the athanor project folder (no pyproject.toml and "
                              "cluster/cli.py)")
        if pip:
            raise SubmitError("--pip installs the project's dependencies from its pyproject.toml: run from the "
                              "project folder, or leave --pip out to use the athanor installed on the cluster")
        path = Path(config).resolve()
        if not path.is_file():
            raise SubmitError(f"config {config} not found")
        return path.parent, path.name
    path = Path(config).resolve()
    try:
        rel = path.relative_to(project)
    except ValueError:
        raise SubmitError(f"config {config} is outside the project folder {project}; it travels in the job's "
                          "working_dir, so put it under the project (e.g. configs/)") from None
    if rel.parts and rel.parts[0] in ("data", "runs", "outputs"):
        raise SubmitError(f"config {config} sits in {rel.parts[0]}/, which the job's working_dir leaves out")
    return project, rel.as_posix()


def submit(config: str, overrides: list[str], address: str | None, env_names: list[str], *, stage: str = "run",
           force: bool = False, pip: bool = False, working_dir: str | None = None,
           submission_id: str | None = None) -> str:
    """Validate the config here (fail before anything is uploaded), then submit; returns the job id."""
    check_env_names(env_names)
    cfg = load_config(config, overrides)
    workdir = cfg.run.workdir
    if "://" not in workdir and not Path(workdir).expanduser().is_absolute():
        raise SubmitError(f"run.workdir '{workdir}' is relative: on the cluster it would land in the job's temporary "
                          "working_dir; give a shared URI or path, e.g. --set run.workdir=s3://bucket/runs/name")
    project, rel_config = _project_and_config(config, working_dir, pip)
    runtime_env = build_runtime_env(project, env_names, pip)
    jobs = client(address)
    try:
        return jobs.submit_job(entrypoint=build_entrypoint(rel_config, overrides, stage, force, verbose()),
                               runtime_env=runtime_env, submission_id=submission_id,
                               metadata={"athanor.run_name": cfg.run.name, "athanor.config": rel_config})
    except RuntimeError as err:
        raise SubmitError(f"the job server at {address_or_default(address)} refused the job: {err}") from None


def _info(jobs, job_id: str, address: str | None):
    try:
        return jobs.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise SubmitError(f"no job {job_id} on {address_or_default(address)}") from None
        raise SubmitError(f"job {job_id}: {err}") from None


def status(job_id: str, address: str | None, wait: bool = False, timeout: float | None = None,
           poll_s: float = 2.0) -> tuple[str, str]:
    """The job's status (and message); with wait, poll until it ends or timeout seconds pass."""
    jobs = client(address)
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        info = _info(jobs, job_id, address)
        state = str(info.status.value if hasattr(info.status, "value") else info.status)
        if not wait or state in TERMINAL:
            return state, info.message or ""
        if deadline is not None and time.monotonic() > deadline:
            raise SubmitError(f"job {job_id} still {state} after {timeout:.0f} s")
        time.sleep(poll_s)


def logs(job_id: str, address: str | None, follow: bool = False, out=None) -> None:
    """Print the driver's log; with follow, stream it until the job ends."""
    out = out or sys.stdout
    jobs = client(address)
    _info(jobs, job_id, address)  # an unknown id is one clear line, not a stack trace
    if not follow:
        out.write(jobs.get_job_logs(job_id))
        out.flush()
        return

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())


def stop(job_id: str, address: str | None) -> bool:
    """Ask Ray to stop the job; False when it had already ended."""
    jobs = client(address)
    _info(jobs, job_id, address)
    return bool(jobs.stop_job(job_id))


def list_jobs(address: str | None) -> list[tuple[str, str, str]]:
    """(job id, status, entrypoint) of the cluster's submitted jobs, oldest first."""
    rows = []
    for j in sorted(client(address).list_jobs(), key=lambda j: j.start_time or 0):
        if j.submission_id:
            rows.append((j.submission_id, str(getattr(j.status, "value", j.status)), j.entrypoint))
    return rows


def add_parsers(sub) -> None:
    """`submit` and `jobs status|logs|stop|list` on the CLI's subparsers."""
    addr = {"default": None, "help": f"job server; default $RAY_API_SERVER_ADDRESS, $RAY_ADDRESS or {DEFAULT_ADDRESS}"}
    p = sub.add_parser("submit", help="run the pipeline on a Ray cluster as a job (Ray Jobs API)")
    p.add_argument("config", help="YAML config inside the project folder (it travels with the job)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override passed through to the job (repeatable)")
    p.add_argument("--address", **addr)
    p.add_argument("--env", dest="env_names", action="append", default=[], metavar="NAME",
                   help="forward this environment variable from this shell to the job (repeatable; not secrets: the "
                        "nodes hold their own credentials)")
    p.add_argument("--stage", choices=STAGES, default="run", help="which athanor command the job runs")
    p.add_argument("--force", action="store_true", help="passed through: re-run stages that are up to date")
    p.add_argument("--pip", action="store_true",
                   help="install pyproject's dependencies in the job's runtime_env (for nodes without the image)")
    p.add_argument("--working-dir", default=None, help="the project folder to ship (default: current directory)")
    p.add_argument("--submission-id", default=None, help="job id to use instead of a generated one")

    jobs = sub.add_parser("jobs", help="status, logs, stop or list of submitted jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)
    st = jsub.add_parser("status", help="a job's status")
    st.add_argument("job_id")
    st.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it SUCCEEDED")
    st.add_argument("--timeout", type=float, default=None, help="with --wait: give up after this many seconds")
    lg = jsub.add_parser("logs", help="a job's driver log")
    lg.add_argument("job_id")
    lg.add_argument("--follow", "-f", action="store_true", help="keep printing until the job ends")
    sp = jsub.add_parser("stop", help="stop a running job (SIGTERM: training first checkpoints the step it is at)")
    sp.add_argument("job_id")
    ls = jsub.add_parser("list", help="the cluster's submitted jobs")
    for q in (st, lg, sp, ls):
        q.add_argument("--address", **addr)


def run_command(args) -> int:
    """Carry out `submit` or `jobs ...` from parsed arguments."""
    if args.command == "submit":
        job_id = submit(args.config, args.overrides, args.address, args.env_names, stage=args.stage,
                        force=args.force, pip=args.pip, working_dir=args.working_dir,
                        submission_id=args.submission_id)
        flag = f" --address {args.address}" if args.address else ""
        print(f"submitted job {job_id}")
        print(f"follow it:  athanor jobs logs {job_id} --follow{flag}")
        print(f"status:     athanor jobs status {job_id}{flag}")
        print(f"stop it:    athanor jobs stop {job_id}{flag}")
        return 0
    if args.jobs_command == "status":
        state, message = status(args.job_id, args.address, wait=args.wait, timeout=args.timeout)
        print(f"{args.job_id}: {state}" + (f" ({message})" if message else ""))
        return 0 if not args.wait or state == "SUCCEEDED" else 1
    if args.jobs_command == "logs":
        logs(args.job_id, args.address, follow=args.follow)
        return 0
    if args.jobs_command == "stop":
        stopped = stop(args.job_id, args.address)
        print(f"{args.job_id}: " + ("stop requested" if stopped else "already ended"))
        return 0
    for job_id, state, entrypoint in list_jobs(args.address):
        print(f"{job_id}  {state:<10}  {entrypoint}")
    return 0
