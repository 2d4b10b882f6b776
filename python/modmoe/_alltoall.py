"""Expert-parallel dispatch and combine (C++: include/modmoe/all_to_all.h), shaped like
FlashInfer's MoeAlltoAll. One process per GPU; every rank builds one over the same NCCL
communicator. CUDA only."""

from typing import Any, List, NamedTuple

from . import _C
from ._api import _empty, _framework

_BACKENDS = {"nvlink": _C.BACKEND_NVLINK, "nccl": _C.BACKEND_NCCL}


class DispatchResult(NamedTuple):
    topk_ids: Any  # [ep_size, runtime_max_tokens_per_rank, top_k] int32; padding rows are -1
    payloads: List[Any]  # one [ep_size, runtime_max_tokens_per_rank, *] view per input payload
    recv_counts: Any  # [ep_size] int32: tokens received from each rank


def _comm_handle(comm):
    """An ncclComm_t as an int, or an object that gives it (``_comm_ptr()``)."""
    if isinstance(comm, int):
        return comm
    get = getattr(comm, "_comm_ptr", None)
    if get is not None:
        return int(get())
    raise TypeError(f"modmoe.AllToAll: argument 'comm' is a {type(comm).__name__}: expected "
                    "the address of an ncclComm_t (int) or an object with _comm_ptr()")


class AllToAll:
    """Dispatch tokens to the ranks that own their experts, combine the expert outputs back.

    Rank r owns experts [r * E / ep_size, (r + 1) * E / ep_size). dispatch() returns views of
    the receive buffers, valid until this rank's combine() (a peer's next dispatch may then
    overwrite them); combine() sums, per token, the rows it sent (fp32, rank order, one cast),
    unweighted: the experts already applied the weights.
    """

    def __init__(
        self,
        comm,
        ep_rank,
        ep_size,
        max_num_tokens,
        top_k,
        num_experts,
        hidden_size,
        *,
        max_payload_bytes_per_token=None,
        backend="nvlink",
        num_sms=0,
        timeout_s=10.0,
        combine_pull=True,
    ):
        if max_payload_bytes_per_token is None:
            # hidden (bf16) and topk_weights (fp32); the ids travel on their own.
            max_payload_bytes_per_token = 2 * hidden_size + 4 * top_k
        self._impl = _C.AllToAll(
            _comm_handle(comm), _BACKENDS[backend], ep_size, ep_rank, num_experts, top_k,
            max_num_tokens, max_payload_bytes_per_token, hidden_size, num_sms, timeout_s,
            combine_pull)
        self._framework = None
        self._like = None
        self._num_tokens = 0

    def _wrap(self, array):
        if self._framework in ("torch", "cupy"):
            return __import__(self._framework).from_dlpack(array)
        return array

    def dispatch(self, token_selected_experts, input_payloads, runtime_max_tokens_per_rank,
                 stream=None):
        """token_selected_experts: [T, k] int32 global ids; input_payloads: [T, *] tensors
        (hidden_states, topk_weights, scales, lora ids, ...). Asynchronous on `stream`."""
        self._framework = _framework(token_selected_experts)
        self._like = token_selected_experts
        self._num_tokens = token_selected_experts.shape[0]
        ids, payloads, counts = self._impl.dispatch(
            token_selected_experts, list(input_payloads), runtime_max_tokens_per_rank, stream)
        return DispatchResult(self._wrap(ids), [self._wrap(p) for p in payloads],
                              self._wrap(counts))

    def combine_buffer(self, runtime_max_tokens_per_rank):
        """[ep_size, runtime_max_tokens_per_rank, H] bf16 in the workspace: experts() can
        write here (output=) and combine() reads it without a copy."""
        return self._wrap(self._impl.combine_buffer(runtime_max_tokens_per_rank))

    # FlashInfer's name for the same buffer.
    def get_combine_payload_tensor_in_workspace(self, runtime_max_tokens_per_rank,
                                                hidden_size=None, dtype=None):
        return self.combine_buffer(runtime_max_tokens_per_rank)

    def combine(self, payload, runtime_max_tokens_per_rank, payload_in_workspace=False,
                output=None, stream=None):
        """payload: [ep_size, runtime_max_tokens_per_rank, H] bf16 -> output [T, H] bf16, T the
        tokens of the last dispatch. payload_in_workspace is FlashInfer's flag; modmoe sees
        whether the payload is combine_buffer() by itself."""
        if output is None:
            output = _empty(self._like, (self._num_tokens, self._impl.hidden_size), "bf16")
        self._impl.combine(payload, output, runtime_max_tokens_per_rank, stream)
        return output

    def check(self):
        """Raises modmoe.Error if a kernel of this object recorded an error (a timed-out wait,
        an oversized count), naming the rank and the buffer. Call after synchronising."""
        self._impl.check()

    def close(self):
        """Frees the buffers; call before destroying the communicator."""
        self._impl.close()

    @property
    def ep_size(self):
        return self._impl.ep_size

    @property
    def ep_rank(self):
        return self._impl.ep_rank
