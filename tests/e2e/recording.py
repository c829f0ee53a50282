"""RecordedStream: one client's Generate call, run in a thread, keeping every frame and its arrival."""

import time
from dataclasses import dataclass, field
from typing import Any

import grpc

from client.library import ConveyorClient
from protos import inference_pb2


@dataclass
class RecordedStream:
    prompt: str
    max_tokens: int
    frames: list[inference_pb2.GenerateResponse] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # time.monotonic() of each frame
    error: grpc.RpcError | None = None
    # Greedy with EOS ignored, so an undisturbed run gives exactly `max_tokens` known tokens.
    sampling: dict[str, Any] = field(default_factory=lambda: {"temperature": 0.0, "ignore_eos": True})

    @property
    def token_ids(self) -> list[int]:
        return [t for f in self.frames for t in f.token_ids]

    @property
    def indexes(self) -> list[int]:
        """The token index of every token received, in arrival order."""
        return [i for f in self.frames for i in range(f.index, f.index + len(f.token_ids))]

    @property
    def text(self) -> str:
        return "".join(f.text for f in self.frames)

    def choice(self, index: int) -> "RecordedStream":
        """The frames of one of the request's n completions, as a stream of their own."""
        frames = [f for f in self.frames if f.choice_index == index]
        return RecordedStream(self.prompt, self.max_tokens, frames, sampling=self.sampling, error=self.error)

    def run(self, address: str) -> None:
        try:
            with ConveyorClient(address) as client:
                for frame in client.stream(
                    self.prompt, max_tokens=self.max_tokens, timeout_s=300, **self.sampling
                ):
                    self.frames.append(frame)
                    self.arrivals.append(time.monotonic())
        except grpc.RpcError as error:
            self.error = error
