"""`sllm fn ...`: create, deploy, list, describe, invoke, remove and read the logs of functions.

Every verb but `new` talks to the gateway over HTTP only (sllm_cli.client). `deploy` also converts
the model locally and uploads it to the platform's store (sllm_cli.deploy).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sllm.errors import Conflict, InvalidInput, Unauthorized
from sllm.spec import validate_name
from sllm_cli.app import Groups, group
from sllm_cli.client import Event, GatewayClient
from sllm_cli.misc import scaffold
from sllm_cli.output import add_gateway_flags, gateway_client, human_bytes, print_table


def _progress_bar(desc: str) -> Callable[[int], Callable[[int], None]]:
    """A factory: total bytes -> per-chunk callback feeding a tqdm bar on stderr."""

    def factory(total: int) -> Callable[[int], None]:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024)

        def update(n: int) -> None:
            bar.update(n)
            if bar.n >= total:
                bar.close()

        return update

    return factory


def _conversion_bar(source: Path) -> Callable[[int, int], None]:
    """``progress(done, total)`` of the converter as a tqdm bar on stderr (called only when a
    conversion runs, not when the conversion cache has it)."""
    from tqdm import tqdm

    state: dict[str, Any] = {}

    def progress(done: int, total: int) -> None:
        if "bar" not in state:
            print(f"converting {source} into the sllm format ...", file=sys.stderr)
            state["bar"] = tqdm(
                total=total, desc="convert", unit="B", unit_scale=True, unit_divisor=1024
            )
        bar = state["bar"]
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return progress


def cmd_new(args: argparse.Namespace) -> int:
    dst = scaffold(args.name, args.template, Path(args.dir), model=args.model)
    print(f"created {dst} from template {args.template}")
    if args.model is None:
        print(f"next: set model: in {dst / 'function.yaml'}, then `sllm fn deploy -f {dst}`")
    else:
        print(f"next: `sllm fn deploy -f {dst}`")
    return 0


def deploy_folder(client: GatewayClient, path: Path) -> dict[str, Any]:
    """Everything `sllm fn deploy` does (see sllm_cli.deploy); returns the registered record.
    Bad input (yaml, model path, handler module) fails before the gateway is contacted."""
    from sllm_cli import deploy

    folder = deploy.load_function(path)
    name = folder.spec.name
    source = deploy.resolve_model(folder)
    sources = deploy.handler_sources(folder)
    requirements = deploy.requirements_text(folder)
    store_url = client.info().get("store_url")
    if not isinstance(store_url, str) or not store_url:
        raise InvalidInput("the gateway did not say where its store is (/system/info)")
    deploy.check_store_reachable(store_url, client.config.url)
    ckpt = deploy.prepare_checkpoint(
        source, deploy.conversion_cache_dir(), progress=_conversion_bar(source.path)
    )
    deploy.check_checkpoint(ckpt)
    if note := deploy.check_backend(folder.spec, ckpt):  # nothing to check against here
        print(note, file=sys.stderr)
    key, size, pushed = deploy.upload_checkpoint(
        ckpt, name, store_url, progress_factory=_progress_bar("upload")
    )
    where = "uploaded to" if pushed else "already in"
    print(f"checkpoint {key} ({human_bytes(size)}) {where} {store_url}", file=sys.stderr)
    return _register(
        client, name, deploy.deploy_body(folder.spec, key, size, sources, requirements)
    )


def cmd_deploy(args: argparse.Namespace) -> int:
    with gateway_client(args) as client:
        record = deploy_folder(client, Path(args.file))
    name = (record.get("spec") or {}).get("name") or record.get("name")
    print(f"deployed {name} (revision {record.get('revision', '?')})")
    handler = str((record.get("spec") or {}).get("handler", "chat"))
    if ":" in handler:
        print(f'invoke it: echo \'{{"prompt": "Hello"}}\' | sllm fn invoke {name} --json')
    else:
        print(f"invoke it: echo 'Hello' | sllm fn invoke {name}")
    return 0


def _register(client: GatewayClient, name: str, body: dict[str, Any]) -> dict[str, Any]:
    if client.exists(name):
        return client.update(name, body)
    try:
        return client.create(body)
    except Conflict:
        # Created by someone else between our check and our POST: update in place instead.
        return client.update(name, body)


def _replicas(fn: dict[str, Any]) -> str:
    r = fn.get("replicas") or {}
    return f"{r.get('ready', 0)}/{r.get('desired', 0)}"


def cmd_list(args: argparse.Namespace) -> int:
    with gateway_client(args) as client:
        functions = client.functions()
    if args.json:
        print(json.dumps(functions, indent=2))
        return 0
    if not functions:
        print("no functions deployed (create one with `sllm fn new NAME --template llm-chat`)")
        return 0
    rows = []
    for fn in sorted(functions, key=lambda f: str(f.get("name"))):
        spec = fn.get("spec") or {}
        rows.append(
            [
                str(fn.get("name")),
                str(spec.get("handler", "")),
                _replicas(fn),
                str(fn.get("revision", "")),
                human_bytes(int(fn.get("checkpoint_bytes") or 0)),
                str(spec.get("model", "")),
            ]
        )
    print_table(["NAME", "HANDLER", "READY", "REVISION", "CHECKPOINT", "MODEL"], rows)
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    validate_name(args.name, "NAME")
    with gateway_client(args) as client:
        fn = client.function(args.name)
    if args.json:
        print(json.dumps(fn, indent=2))
        return 0
    spec = fn.get("spec") or {}
    scale = spec.get("scale") or {}
    gen = spec.get("generation") or {}
    replicas = fn.get("replicas") or {}
    print(f"Name:        {fn.get('name')}")
    print(f"Model:       {spec.get('model')}")
    print(f"Handler:     {spec.get('handler')}")
    print(f"Backend:     {spec.get('backend', 'auto')}")
    print(f"Revision:    {fn.get('revision')}")
    print(
        f"Checkpoint:  {fn.get('checkpoint')} ({human_bytes(int(fn.get('checkpoint_bytes') or 0))})"
    )
    print(
        f"Scale:       min {scale.get('min')}, max {scale.get('max')}, target concurrency "
        f"{scale.get('target_concurrency')}, keep alive {scale.get('keep_alive_s')}s"
    )
    print(
        f"Generation:  max_tokens {gen.get('max_tokens')}, temperature {gen.get('temperature')}, "
        f"top_p {gen.get('top_p')}"
    )
    print(
        f"Replicas:    {replicas.get('ready', 0)} ready, {replicas.get('starting', 0)} starting, "
        f"{replicas.get('desired', 0)} desired"
    )
    instances = fn.get("instances") or []
    print("\nInstances:")
    if instances:
        print_table(
            ["ID", "NODE", "DEVICE", "STATE", "BACKEND", "IN FLIGHT", "ADDRESS"],
            [
                [
                    str(i.get("id")),
                    str(i.get("node")),
                    str(i.get("device")),
                    str(i.get("state")),
                    str(i.get("backend") or "-"),
                    str(i.get("in_flight", 0)),
                    str(i.get("address") or "-"),
                ]
                for i in instances
            ],
        )
        for reason in sorted({str(i.get("backend_reason") or "") for i in instances} - {""}):
            print(f"  backend: {reason}")  # why: an auto that fell back names what vLLM lacked
    else:
        print("  none (scaled to zero: the next request starts one)")
    cache = fn.get("cache") or []
    print("\nCheckpoint cached on:")
    if cache:
        print_table(
            ["NODE", "TIERS"],
            [[str(c.get("node")), ", ".join(map(str, c.get("tiers") or [])) or "-"] for c in cache],
        )
    else:
        print("  no node yet (the first start pulls it from the store)")
    return 0


def _read_input(args: argparse.Namespace) -> str:
    if args.data is not None:
        return str(args.data)
    if sys.stdin.isatty():
        print("reading the request from stdin (end with Ctrl-D) ...", file=sys.stderr)
    return sys.stdin.read()


def invoke_body(handler: str, text: str, args: argparse.Namespace) -> dict[str, Any]:
    """The request body: with --json, the input as the JSON object it is (streamed only if it
    says ``"stream": true``); otherwise the text as the user's message (chat) or the prompt
    (completion, custom handlers), streamed unless --no-stream. Flags add generation options."""
    body: dict[str, Any]
    if args.json:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"--json: the input is not valid JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise InvalidInput("--json: the input must be a JSON object")
        body = parsed
    elif handler == "chat":
        body = {"messages": [{"role": "user", "content": text.strip()}]}
    else:
        body = {"prompt": text}
    if not args.json:
        body["stream"] = not args.no_stream
    elif args.no_stream:
        body["stream"] = False
    for flag, key in (
        ("max_tokens", "max_tokens"),
        ("temperature", "temperature"),
        ("seed", "seed"),
    ):
        value = getattr(args, flag)
        if value is not None:
            body[key] = value
    return body


def print_events(events: Iterable[Event], as_json: bool) -> None:
    """Stream deltas to stdout as they arrive; print a whole answer's text (or its JSON)."""
    ended_with_newline = True
    for event in events:
        if event.delta is not None:
            sys.stdout.write(event.delta)
            sys.stdout.flush()
            if event.delta:
                ended_with_newline = event.delta.endswith("\n")
        elif event.json is not None:
            data = event.json
            if not as_json and isinstance(data, dict) and isinstance(data.get("text"), str):
                text = data["text"]
            else:
                text = json.dumps(data, indent=None if as_json else 2)
            sys.stdout.write(text)
            ended_with_newline = text.endswith("\n")
        elif event.text is not None:
            sys.stdout.write(event.text)
            ended_with_newline = event.text.endswith("\n")
    if not ended_with_newline:
        sys.stdout.write("\n")
    sys.stdout.flush()


def _handler_of(client: GatewayClient, name: str) -> str:
    try:
        return str((client.function(name).get("spec") or {}).get("handler", "chat"))
    except Unauthorized:
        if not client.config.key:
            raise
        raise Unauthorized(
            f"turning plain text into {name}'s request needs the admin token (to look up its "
            f"handler); with only a key, send JSON: sllm fn invoke {name} --json -d "
            '\'{"messages": [{"role": "user", "content": "..."}]}\''
        ) from None


def cmd_invoke(args: argparse.Namespace) -> int:
    validate_name(args.name, "NAME")
    with gateway_client(args) as client:
        # The handler decides how plain text is wrapped; a JSON body needs no lookup (and so
        # no admin token: a key, or nothing for a public function, is enough).
        handler = "" if args.json else _handler_of(client, args.name)
        body = invoke_body(handler, _read_input(args), args)
        print_events(client.invoke(args.name, body, timeout_s=args.timeout), args.json)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    validate_name(args.name, "NAME")
    with gateway_client(args) as client:
        client.remove(args.name)
    print(f"removed {args.name} (its instances drain and stop)")
    return 0


def cmd_scale(args: argparse.Namespace) -> int:
    validate_name(args.name, "NAME")
    if args.replicas < 0:
        raise InvalidInput(f"REPLICAS: must be >= 0, got {args.replicas}")
    with gateway_client(args) as client:
        client.scale(args.name, args.replicas)
    print(
        f"scaling {args.name} to {args.replicas} replica(s); replicas above scale.min stop "
        "again once idle past keep_alive"
    )
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    validate_name(args.name, "NAME")
    with gateway_client(args) as client:
        client.function(args.name)  # a clear "not found" rather than an empty answer
        lines = client.logs(args.name, args.tail)
    for line in lines:
        instance = line.get("instance_id", "?")
        node = line.get("node") or line.get("node_id") or "?"
        print(f"[{node}/{instance}] {line.get('line', '')}")
    return 0


def register(root: argparse._SubParsersAction[argparse.ArgumentParser], groups: Groups) -> None:
    fn = group(root, groups, "fn", "create, deploy, invoke and manage functions")

    p = fn.add_parser("new", help="create a function folder from a template")
    p.add_argument("name", help="function name (DNS-1123: lower-case letters, digits, '-')")
    p.add_argument("--template", "-t", default="llm-chat", help="template (sllm template list)")
    p.add_argument("--dir", default=".", help="parent directory of the new folder")
    p.add_argument("--model", help="model to write into function.yaml (path or package://...)")
    p.set_defaults(func=cmd_new)

    p = fn.add_parser("deploy", help="convert, upload and register (or update) a function")
    p.add_argument("-f", "--file", default=".", help="function.yaml or its folder (default: .)")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_deploy)

    p = fn.add_parser("list", help="list deployed functions")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_list)

    p = fn.add_parser("describe", help="replicas, instances and checkpoint cache of a function")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the gateway's JSON")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_describe)

    p = fn.add_parser("invoke", help="send stdin to a function, stream its answer to stdout")
    p.add_argument("name")
    p.add_argument("-d", "--data", help="the request (instead of stdin)")
    p.add_argument("--json", action="store_true", help="input is a JSON body; print JSON")
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer")
    p.add_argument("--max-tokens", type=int, dest="max_tokens")
    p.add_argument("--temperature", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--timeout", type=float, default=600.0, help="seconds (default 600)")
    p.add_argument(
        "--key", help="invocation key (default: $SLLM_KEY, 'key' in the config file, the token)"
    )
    add_gateway_flags(p)
    p.set_defaults(func=cmd_invoke)

    p = fn.add_parser("remove", help="remove a function (instances drain and stop)")
    p.add_argument("name")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_remove)

    p = fn.add_parser("scale", help="set a function's replicas now (between 0 and scale.max)")
    p.add_argument("name")
    p.add_argument("replicas", type=int)
    add_gateway_flags(p)
    p.set_defaults(func=cmd_scale)

    p = fn.add_parser("logs", help="recent log lines of a function's instances")
    p.add_argument("name")
    p.add_argument("--tail", type=int, default=100, help="how many lines (default 100)")
    add_gateway_flags(p)
    p.set_defaults(func=cmd_logs)
