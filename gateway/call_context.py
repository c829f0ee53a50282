"""CallContext: what every call on this gateway reads, built once at start, and the caller."""

from concurrent.futures import Executor
from dataclasses import dataclass

from opentelemetry.trace import Tracer

from checkpoints import ModelKind
from gateway.auth import Principal
from gateway.fleet import FleetMonitor
from gateway.job_watch import WatchPolicy
from gateway.load_limits import LoadLimits
from gateway.queues import GatewayQueues
from gateway.served_models import KIND_TO_PROTO, ServedModel, ServedModels
from gateway.validation import Limits
from protos import inference_pb2


@dataclass(frozen=True, slots=True)
class Caller:
    """Who sent a request: a name for limits and logs, and the API key's grants if keys are on."""

    name: str
    principal: Principal | None


@dataclass(frozen=True, slots=True)
class CallContext:
    models: ServedModels
    queues: GatewayQueues
    fleet: FleetMonitor
    load_limits: LoadLimits
    executor: Executor  # tokenizers and detokenizers run here, off the event loop
    tracer: Tracer
    watch_policy: WatchPolicy
    default_max_tokens: int

    def check_model(self, name: str, caller: Caller, kind: ModelKind | None) -> ServedModel:
        """The model a request names, if this caller may use it; `kind` None: either kind."""
        model = self.models.resolve(name, kind)
        if caller.principal is not None:
            caller.principal.check_model(model.name)
        return model

    def max_context(self, model: ServedModel) -> int:
        """The smallest context among its live workers, else its checkpoint's."""
        return self.fleet.view.of(model.name).max_context or model.checkpoint_max_context

    def limits(self, model: ServedModel) -> Limits:
        return Limits(
            model.tokenizer.vocab_size,
            self.max_context(model),
            self.default_max_tokens,
            model.sampling_defaults,
        )

    def queued_jobs(self, model: ServedModel) -> int:
        return self.fleet.view.of(model.name).queued_now(self.queues.submitted(model.name))

    def info(self, model: ServedModel) -> inference_pb2.ModelInfo:
        fleet = self.fleet.view.of(model.name)
        return inference_pb2.ModelInfo(
            id=model.name,
            max_context=self.max_context(model),
            num_workers=fleet.num_workers,
            is_default=self.models.is_default(model),
            kind=KIND_TO_PROTO[model.kind],
            dimension=model.dimension,
            architecture=fleet.architecture or model.architecture,
            dtype=fleet.dtype,
            quantization=fleet.quantization,
        )
