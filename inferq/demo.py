"""`inferq demo`: the whole path on one machine with no servers.

SQLite database + SQLite-file broker (unless INFERQ_* points elsewhere), an in-process
worker service, a few dozen varied prompts sent through Celery, results and a summary.
"""

from __future__ import annotations

import itertools
import sys
import threading
import time
from datetime import UTC, datetime, timedelta
from typing import Any

QUESTIONS = [
    "What is the capital of France?",
    "Name three primary colors.",
    "What is 12 times 12?",
    "Write a haiku about autumn leaves.",
    "Explain photosynthesis in one sentence.",
    "What is the boiling point of water in Celsius?",
    "Give me a synonym for 'happy'.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "What is the largest planet in the solar system?",
    "Suggest a name for a pet goldfish.",
    "Why is the sky blue? Answer briefly.",
]
SYSTEMS = [
    None,
    "You are a concise assistant. Answer in one short sentence.",
    "You are a pirate. Answer every question like a pirate would.",
]
RAW_PROMPTS = ["Once upon a time, in a small village by the sea,", "The three laws of robotics are"]


def demo_jobs(count: int, max_tokens: int) -> list[dict[str, Any]]:
    """A deterministic, varied workload: chat with and without system prompts, raw prompts,
    greedy and seeded sampling, stop strings, two priorities."""
    jobs: list[dict[str, Any]] = []
    combos = itertools.cycle(itertools.product(QUESTIONS, SYSTEMS))
    for i in range(count):
        if i % 9 == 8:
            jobs.append({"prompt": RAW_PROMPTS[i % 2], "params": {"max_tokens": max_tokens}})
            continue
        question, system = next(combos)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question}
        ]
        params: dict[str, Any] = {"max_tokens": max_tokens}
        if i % 5 == 3:
            params.update(temperature=0.7, top_p=0.9, top_k=50, seed=i)
        if i % 7 == 6:
            params["stop"] = ["."]
        jobs.append({"messages": messages, "params": params, "priority": 5 if i % 6 == 0 else 0})
    return jobs


#: Example list prices (per million tokens) and an hourly CPU rate, set once so the demo's
#: report shows costs; change them with `inferq prices set` / `inferq prices rate`.
EXAMPLE_PRICES = {"prompt": "0.02", "cached_prompt": "0.01", "completion": "0.05"}
EXAMPLE_CPU_RATE = "0.10"


def seed_example_prices(engine, model: str) -> None:
    """Set the example prices and CPU rate unless the model / CPU has some already."""
    from decimal import Decimal

    from storage.prices import list_prices, set_price, set_rate

    prices, rates = list_prices(engine)
    if not any(p.model == model for p in prices):
        set_price(engine, model, **{k: Decimal(v) for k, v in EXAMPLE_PRICES.items()})
    if not any(r.target == "cpu" for r in rates):
        set_rate(engine, "cpu", Decimal(EXAMPLE_CPU_RATE))


def _print_results(views, jobs) -> None:
    for n, (view, job) in enumerate(zip(views, jobs, strict=True), 1):
        asked = job.get("prompt") or job["messages"][-1]["content"]
        answer = view.result.text if view.result else f"<{view.status}: {view.error}>"
        answer = " ".join(answer.split())
        print(f"{n:>3}. {asked[:44]:<44} -> {answer[:90]}")


def _serve(service, client, workload: list[dict[str, Any]]) -> tuple[list, list]:
    """Submit and wait on a thread of its own while the worker serves on this one (the
    engine runs fastest on the main thread). Embedded, results are read from the database
    (a producer on Redis waits on its result keys)."""
    got: dict[str, Any] = {}

    def submit_and_wait() -> None:
        try:
            got["ids"] = client.submit_many(workload)
            if client.settings.resolved_result_url is None:
                got["views"] = service.repo.wait_ended(got["ids"], timeout=1800)
            else:
                got["views"] = client.wait_many(got["ids"], timeout=1800)
        except BaseException as exc:
            got["error"] = exc

    producer = threading.Thread(target=submit_and_wait, name="demo-client", daemon=True)
    producer.start()
    service.run(until=lambda: not producer.is_alive())
    if "error" in got:
        raise got["error"]
    return got["ids"], got["views"]


def run_demo(jobs: int = 36, max_tokens: int = 48) -> int:
    from api_client import InferqClient
    from inferq.logs import configure_logging
    from inferq.settings import get_settings
    from storage.db import make_engine
    from storage.migrate import upgrade
    from worker.prep.capture import log_path_for
    from worker.prep.progress import prep_session
    from worker.service.app import WorkerService

    settings = get_settings()
    print(f"database: {settings.resolved_database_url.split('@')[-1]}")
    print(f"broker:   {settings.resolved_broker_url.split('@')[-1]}")
    print(f"model:    {settings.model}")
    # The worker's logs and the libraries' output (model loading, warnings) go to a file.
    log_path = log_path_for(settings.home, "demo")
    print(f"logs:     {log_path}", flush=True)
    workload = demo_jobs(jobs, max_tokens)
    # Open for the rest of the process: the worker's threads may log until it exits.
    log_file = open(log_path, "a", buffering=1)  # noqa: SIM115
    configure_logging("INFO", stream=log_file)
    try:
        with prep_session(log_path, library_logs=False) as view:
            upgrade(settings.resolved_database_url)
            client = InferqClient(settings)
            seed_example_prices(make_engine(settings.resolved_database_url), settings.model)
            with view.stage("load", f"{settings.model} (prepared if needed)"):
                service = WorkerService(settings)
            with view.stage("serve", f"{len(workload)} jobs through the queue"):
                run_from = datetime.now(UTC)
                started = time.perf_counter()
                ids, views = _serve(service, client, workload)
                wall = time.perf_counter() - started
            summary = service.repo.summary(ids)
    except Exception as exc:
        print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
        print(f"full log (traceback and library output): {log_path}", file=sys.stderr)
        return 1
    _print_results(views, workload)
    tokens = sum(v.result.completion_tokens for v in views if v.result)
    done = sum(v.status == "done" for v in views)
    print(
        f"\n{done}/{len(ids)} jobs done in {wall:.1f}s: {done / wall:.2f} jobs/s, "
        f"{tokens / wall:.1f} output tokens/s"
    )
    print(
        f"mean queue wait {summary['mean_queue_wait_s']:.2f}s, "
        f"mean time to first token {summary['mean_ttft_s']:.2f}s, "
        f"mean batch size {summary['mean_batch_size']:.1f}"
    )
    _print_usage(service.repo.engine, run_from)
    return 0 if done == len(ids) else 1


def _print_usage(engine, since: datetime) -> None:
    """This run's tokens and costs, as `inferq report usage` shows them."""
    from inferq.report_cli import emit
    from storage import reports

    rows = reports.usage(engine, since, datetime.now(UTC) + timedelta(seconds=1))
    title = "\nthis run's usage and cost (example prices; more: inferq report --help)"
    shown = (
        "tenant",
        "jobs",
        "done",
        "prompt_tokens",
        "cached_prompt_tokens",
        "completion_tokens",
        "compute_s",
        "list_cost",
        "compute_cost",
        "cache_savings",
    )
    emit(rows, "table", title, sys.stdout, shown=shown)
