"""WorkerSettings: what a worker (or the in-process engine) can be told, by flags and CONVEYOR_* env."""

from typing import Literal

from pydantic import Field, model_validator

from bootstrap.settings import ModelSettings, RedisSettings, TelemetrySettings
from scheduler import Batching

Quantization = Literal["none", "int8", "int4", "w8a8"]
Speculative = Literal["none", "ngram"]


class EngineSettings(ModelSettings):
    """The engine's knobs: the model, the KV pool and the scheduler's budgets."""

    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs; auto = CUDA when there is one."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights, activations and KV cache; auto = float32 on CPU, bfloat16 on a GPU with it, else float16."""
    block_size: int = Field(16, ge=1)
    """Tokens per KV-cache block."""
    max_num_seqs: int = Field(64, ge=1)
    """Sequences running at once (and jobs held)."""
    max_num_batched_tokens: int = Field(2048, ge=1)
    """Token budget of one step (vLLM's default): larger prefills prompts sooner and nearer the GEMM
    roofline, and pauses the streams decoding meanwhile for longer."""
    kv_cache_bytes: int | None = None
    """KV cache size; default: 2 GiB on CPU, on a GPU what gpu_memory_fraction leaves."""
    gpu_memory_fraction: float = Field(0.9, gt=0, le=1)
    """Share of the GPU's memory this worker takes: weights, the largest step's activations (measured
    at start-up), decode graphs and CUDA's own first, the KV cache the rest (vLLM's
    gpu_memory_utilization)."""
    attention_backend: Literal["auto", "cpu", "triton"] = "auto"
    """Attention over the paged cache: cpu = SDPA and the C decode kernel; triton = one kernel per
    layer for a whole step, reading the cache in place (CUDA); auto = triton on CUDA, else cpu."""
    cuda_graphs: bool = True
    """Replay decode steps from CUDA graphs captured at start-up for batch sizes 1, 2, 4, every
    multiple of 8 below max_num_seqs and max_num_seqs itself (padding a step to the next); off =
    every step eager (vLLM's enforce_eager)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of a shared prompt prefix."""
    speculative: Speculative = "none"
    """Speculative decoding, vLLM's methods and names: ngram = prompt lookup, drafts copied from
    the tokens that followed the sequence's own suffix earlier in its context, all checked in one
    forward; greedy requests only (others decode as usual), output identical to plain decoding."""
    num_speculative_tokens: int = Field(4, ge=1, le=16)
    """Most drafted tokens checked per decode step of a sequence."""
    prompt_lookup_min: int = Field(2, ge=1)
    """Shortest suffix looked up in the context for drafts."""
    prompt_lookup_max: int = Field(4, ge=1)
    """Longest suffix looked up; the longest that recurs wins."""
    batching: Batching = "continuous"
    """Who joins the running batch: continuous = any waiting request, as soon as a seat, the step's
    budget and KV blocks allow; static = a batch cut from the head of the queue runs until its
    longest member ends before the next is cut; sequential = one request at a time."""
    num_threads: int | None = None
    """torch CPU threads; default: torch's choice."""
    cpu_decode_kernel: bool = True
    """Decode attention in the C kernel (else gather + SDPA)."""
    cpu_prefill_kernel: bool = True
    """Prompt chunks' attention in the C kernel, every chunk of a step in one call, each query
    scoring only the keys it sees (else SDPA, one call a chunk, over a gathered copy)."""
    cpu_fused_ops: bool = True
    """On a CPU in float32, RoPE, each norm with its residual add and SiLU-and-multiply as one C
    call each (the norm and the activation round otherwise than torch: token-exact as tested, not
    bit for bit); off, the torch ops."""
    quantization: Quantization = "none"
    """CPU quantization of the linear layers: int8 = weights with one scale per output channel;
    int4 = weights in groups of 32 with a scale and a minimum (GGUF's Q4_1, the file's own groups
    when the model is a GGUF); w8a8 = int8 weights and int8 activations (a scale per row), integer
    GEMMs; none = float weights, token-exact with transformers."""

    @model_validator(mode="after")
    def _lookup_bounds(self) -> "EngineSettings":
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"prompt_lookup_min ({self.prompt_lookup_min}) exceeds "
                f"prompt_lookup_max ({self.prompt_lookup_max})"
            )
        return self


class WorkerSettings(EngineSettings, RedisSettings, TelemetrySettings):
    """A serving worker: the engine plus Redis, identity, telemetry and shutdown behaviour."""

    metrics_port: int = Field(9401, ge=-1)
    """Port of /metrics: 0 = any free port, -1 = no page."""
    worker_id: str = ""
    """Default: hostname-pid; a random incarnation suffix is always added."""
    heartbeat_interval_s: float = Field(1.0, gt=0)
    """How often the heartbeat is renewed (and orphans looked for)."""
    claim_min_idle_ms: int = Field(1000, ge=1)
    """A claimed job is not claimed again within this."""
    max_job_attempts: int = Field(3, ge=1)
    """Workers that may die holding a job before it is buried."""
    progress_ttl_s: float = Field(3600.0, gt=0)
    """How long delivered tokens are kept for a resume."""
    drain_timeout_s: float = Field(30.0, ge=0)
    """SIGTERM: finish running work for at most this long."""
    idle_block_ms: int = Field(100, ge=1, le=1000)
    """How long to block on Redis when there is nothing to run (below redis_timeout_s)."""
    health_host: str = "127.0.0.1"
    """Where grpc.health.v1 listens for probes (0.0.0.0 in a pod)."""
    health_port: int = Field(-1, ge=-1)
    """Port of the health server: 0 = any free port, -1 = none."""
    stall_timeout_s: float = Field(300.0, gt=0)
    """Liveness fails when one loop turn takes longer."""
    embed_max_batch_tokens: int = Field(16384, ge=1)
    """Embedding model: padded tokens per batch (inputs x the longest)."""
    embed_max_batch_size: int = Field(64, ge=1)
    """Embedding model: inputs per batch (and calls held at once)."""
    embed_max_wait_ms: float = Field(5.0, ge=0)
    """Embedding model: how long the oldest input waits for a batch to fill."""
    simulate_steps_per_s: float = Field(0.0, ge=0)
    """Capacity planning only: load no weights, give every running job one token per step at this
    many steps per second (conveyor bench --fleet-sim); 0 = run the model."""
