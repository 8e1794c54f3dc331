"""The `inferq` command: demo, model preparation, migrations, the worker, a small client,
reports and prices."""

from __future__ import annotations

import argparse
import json
import sys

from inferq.extras import missing_extra_hint
from inferq.settings import get_settings


def _cmd_demo(args: argparse.Namespace) -> int:
    from inferq.demo import run_demo

    return run_demo(jobs=args.jobs, max_tokens=args.max_tokens)


def _cmd_migrate(args: argparse.Namespace) -> int:
    from storage.migrate import upgrade

    settings = get_settings()
    upgrade(settings.resolved_database_url, args.revision)
    print(f"database at {args.revision}: {settings.resolved_database_url.split('@')[-1]}")
    return 0


def _cmd_worker(args: argparse.Namespace) -> int:
    import logging
    import os

    from inferq.logs import configure_logging, get_logger
    from worker.prep.capture import capture_output, log_path_for
    from worker.service.app import WorkerService

    settings = get_settings()
    # Our JSON lines go to the terminal; what the libraries print while the models load
    # (banners, import-time warnings) goes to a file under INFERQ_HOME/logs.
    terminal = open(os.dup(2), "w", buffering=1, errors="replace")  # noqa: SIM115
    configure_logging(args.loglevel, stream=terminal)
    ours = logging.Filter("inferq")
    handler = logging.getLogger().handlers[0]
    log_path = log_path_for(settings.home, "worker")
    handler.addFilter(ours)
    get_logger("inferq.worker").info("worker.library_output", path=str(log_path))
    try:
        with capture_output(log_path):
            if settings.embedded:
                from storage.migrate import upgrade

                upgrade(settings.resolved_database_url)
            service = WorkerService(settings)  # models load before the first message is taken
    finally:
        handler.removeFilter(ours)
    service.run()
    return 0


def _client(args: argparse.Namespace):
    from api_client import InferqClient

    return InferqClient(tenant=args.tenant)


def _records(client):
    """Embedded (no Redis: results are not published there): the database, read as an
    operator does, for `submit --wait`, `get` and `cancel`; None on Redis."""
    if client.settings.resolved_result_url is not None:
        return None
    from storage.repository import Repository

    return Repository(client.settings.resolved_database_url)


def _cmd_submit(args: argparse.Namespace) -> int:
    from api_client import InvalidJobError

    client = _client(args)
    params = {
        "max_tokens": args.max_tokens,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "stop": args.stop,
    }
    if args.seed is not None:
        params["seed"] = args.seed
    chat = None if args.raw else [{"role": "user", "content": args.text}]
    try:
        job_id = client.submit(
            args.text if args.raw else None,
            messages=chat,
            params=params,
            model=args.model,
            priority=args.priority,
            idempotency_key=args.idempotency_key,
            ttl_s=args.ttl,
            callback_url=args.callback_url,
        )
    except InvalidJobError as exc:
        print(exc, file=sys.stderr)
        return 2
    if not args.wait:
        print(job_id)
        return 0
    repo = _records(client)
    if repo is None:
        view = client.wait(job_id, timeout=args.timeout)
    else:
        (view,) = repo.wait_ended([job_id], timeout=args.timeout)
    print(json.dumps(view.to_dict(), indent=2))
    return 0 if view.status == "done" else 1


def _cmd_get(args: argparse.Namespace) -> int:
    import uuid

    client = _client(args)
    repo = _records(client)
    if repo is None:
        view = client.get(args.job_id)
    else:
        view = repo.get(uuid.UUID(args.job_id), client.tenant)
    if view is None:
        print(f"no job {args.job_id} (or queued, or its result has expired)", file=sys.stderr)
        return 1
    print(json.dumps(view.to_dict(), indent=2))
    return 0


def _cmd_cancel(args: argparse.Namespace) -> int:
    import uuid

    client = _client(args)
    repo = _records(client)
    if repo is None:
        cancelled = client.cancel(args.job_id)
    else:
        cancelled = repo.cancel(uuid.UUID(args.job_id), client.tenant)
    print("cancelled" if cancelled else "not cancelled (already finished, or unknown)")
    return 0 if cancelled else 1


def build_parser() -> argparse.ArgumentParser:
    from inferq import gateway_cli, model_cli, report_cli
    from inferq.params import SamplingParams

    parser = argparse.ArgumentParser(prog="inferq", description=__doc__)
    verbs = parser.add_subparsers(dest="verb", required=True)

    demo = verbs.add_parser("demo", help="run the whole path on embedded defaults (no servers)")
    demo.add_argument("--jobs", type=int, default=36, help="how many prompts to enqueue")
    demo.add_argument("--max-tokens", type=int, default=48, help="max_tokens per job")
    demo.set_defaults(func=_cmd_demo)

    model_cli.add_parsers(verbs)  # model prepare, add, list, remove, quantize

    migrate = verbs.add_parser("migrate", help="alembic upgrade of INFERQ_DATABASE_URL")
    migrate.add_argument("--revision", default="head", help="Alembic revision")
    migrate.set_defaults(func=_cmd_migrate)

    worker = verbs.add_parser("worker", help="run a worker: consume jobs until SIGTERM")
    worker.add_argument("--loglevel", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    worker.set_defaults(func=_cmd_worker)

    submit = verbs.add_parser("submit", help="enqueue a job (chat message unless --raw)")
    submit.add_argument("text")
    submit.add_argument("--raw", action="store_true", help="send TEXT as a raw prompt")
    defaults = SamplingParams()
    submit.add_argument(
        "--max-tokens", type=int, default=defaults.max_tokens, help="most tokens generated"
    )
    submit.add_argument("--temperature", type=float, default=defaults.temperature, help="0: greedy")
    submit.add_argument("--top-p", type=float, default=defaults.top_p, help="nucleus sampling")
    submit.add_argument("--top-k", type=int, default=defaults.top_k, help="0: off")
    submit.add_argument("--seed", type=int, help="makes sampling reproducible")
    submit.add_argument("--stop", action="append", default=[], help="repeat for several")
    submit.add_argument("--ttl", type=float, help="seconds until the job expires")
    submit.add_argument("--callback-url", help="a webhook for the job's end (docs/webhooks.md)")
    submit.add_argument("--model", help="model name (default: the worker's default)")
    submit.add_argument("--tenant", help="default: INFERQ_TENANT (signed with INFERQ_TENANT_KEY)")
    submit.add_argument("--priority", type=int, default=0, help="0..9, higher runs first")
    submit.add_argument("--idempotency-key", help="the same key never runs twice")
    submit.add_argument("--wait", action="store_true", help="wait and print the result")
    submit.add_argument("--timeout", type=float, default=300.0, help="seconds --wait waits")
    submit.set_defaults(func=_cmd_submit)

    get = verbs.add_parser("get", help="print a job's status, result and metrics as JSON")
    get.add_argument("job_id")
    get.add_argument("--tenant", help="default: INFERQ_TENANT")
    get.set_defaults(func=_cmd_get)

    cancel = verbs.add_parser("cancel", help="cancel a queued or running job")
    cancel.add_argument("job_id")
    cancel.add_argument("--tenant", help="default: INFERQ_TENANT")
    cancel.set_defaults(func=_cmd_cancel)

    report_cli.add_parsers(verbs)  # report, prices
    gateway_cli.add_parsers(verbs)  # serve, keys
    return parser


class _DefaultsShown(argparse.HelpFormatter):
    """Help that names each option's default (where it has one worth naming)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        named = isinstance(action, argparse.BooleanOptionalAction) or not (
            default is None or default is False or default == [] or default is argparse.SUPPRESS
        )
        if action.option_strings and named and "%(default)" not in text:
            text = f"{text} (default: %(default)s)".strip()
        return text


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every verb's --help shows its options' defaults."""
    parser.formatter_class = _DefaultsShown
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _show_defaults(sub)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    _show_defaults(parser)
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # a producer's install runs a verb of another role
        hint = missing_extra_hint(args.verb, exc.name or "")
        if hint is None:
            raise
        print(hint, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
