"""The weight paths from the learner to the vLLM engines (cv_ray/weight_sync.py, cv_ray/learner/weight_sender.py).

* Pure parts: the path ``auto`` picks and the learner-side checks (``cv_ray.config.check_weight_sync``),
  what is sent (trainable parameters only, their metadata and bytes), the NCCL group's ranks checked
  against vLLM's own rank arithmetic and init-info class, the sync metrics.
* The NCCL path end to end in one process (``vllm_api``): our sender on vLLM's packed NCCL producer,
  two engines (vLLM's real ``AsyncLLM``, worker session and NCCL receiver, each joining with the rank
  ``nccl_layout`` gave it) on vLLM's packed consumer. Stood in: NCCL itself and CUDA streams
  (tests/rollout/vllm_standin.FakeNcclLink / FakeCudaStreams), the engine core's forward pass.
* The colocated IPC path (``vllm_api``): handles of the learner's own parameters through vLLM's IPC
  receiver into the real model (CUDA IPC stood in by FakeCudaIpc).
* The coordinator's refusals (engines on another GPU, engines without the NCCL receiver).
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
import torch
import vllm_api as vllm_api_lib
import vllm_standin

from cv_ray.config import check_weight_sync, resolve_weight_sync, weight_sync_path
from cv_ray.errors import ConfigError
from cv_ray.learner import weight_sender
from cv_ray.learner.config import LearnerConfig
from cv_ray.learner.weights import iter_full_weights
from cv_ray.rollout.config import RolloutConfig, VLLMConfig
from cv_ray.weight_sync import IpcSync, NcclSync, nccl_layout, sync_metrics

# The fixtures of tests/rollout/vllm_api.py and vllm_standin.py, by their names in this module.
vllm_api, distributed = vllm_api_lib.vllm_api, vllm_api_lib.distributed
make_engine = vllm_standin.make_engine


def _vllm(gpus: float, weight_sync: str = "auto", tp: int = 1) -> RolloutConfig:
    return RolloutConfig(engine="vllm", gpus_per_worker=gpus, vllm=VLLMConfig(weight_sync=weight_sync,
                                                                               tensor_parallel_size=tp))


# ------------------------------------------------------------------------------ paths and checks


SINGLE_GPU = LearnerConfig(gpus_per_rank=0.5)                                     # experiment=single_gpu
TWO_BY_EIGHT = LearnerConfig(num_ranks=8, gpus_per_rank=1, zero_stage=3)          # the 2x8 recipe


@pytest.mark.parametrize("rollout, learner, path", [
    (RolloutConfig(engine="hf"), LearnerConfig(), "object_store"),
    (_vllm(0.5), SINGLE_GPU, "ipc"),
    (_vllm(1), LearnerConfig(gpus_per_rank=1), "nccl"),
    (_vllm(4, tp=4), TWO_BY_EIGHT, "nccl"),
    (_vllm(1), LearnerConfig(), "object_store"),                                   # learner on CPU
    (_vllm(0.5), LearnerConfig(gpus_per_rank=0.5, zero_stage=3), "object_store"),  # rank 0 holds shards only
    (_vllm(1, "object_store"), LearnerConfig(gpus_per_rank=1), "object_store"),    # an explicit choice wins
])
def test_auto_picks_the_fastest_path_the_placement_allows(rollout, learner, path):
    """Mutant: auto always nccl (the single-GPU preset then tries NCCL between two processes on one GPU,
    and a CPU learner has no NCCL at all)."""
    assert weight_sync_path(rollout, learner) == path
    check_weight_sync(rollout, learner)
    resolved = resolve_weight_sync(rollout, learner)
    assert resolved.vllm.weight_sync == path and rollout.vllm.weight_sync in ("auto", path)  # a copy


@pytest.mark.parametrize("rollout, learner, problem", [
    (_vllm(1, "nccl"), LearnerConfig(), "learner.gpus_per_rank=0"),                # NCCL with the learner on CPU
    (_vllm(0.5, "nccl"), LearnerConfig(gpus_per_rank=1), "gpus_per_worker=0.5"),  # NCCL on a shared GPU
    (_vllm(0.5, "ipc"), LearnerConfig(num_ranks=2, gpus_per_rank=0.5), "num_ranks=2"),
    (_vllm(0.5, "ipc"), LearnerConfig(gpus_per_rank=0.5, zero_stage=3), "zero_stage=3"),
    (_vllm(0.5, "ipc"), LearnerConfig(), "on CPU"),
    (RolloutConfig(engine="hf", vllm=VLLMConfig(weight_sync="nccl")), LearnerConfig(gpus_per_rank=1), None),
])
def test_impossible_paths_are_refused_with_the_fix(rollout, learner, problem):
    """Mutants: a check dropped (the run fails later, in NCCL or vLLM's IPC receiver, without a fix)."""
    with pytest.raises(ConfigError) as err:
        if problem is None:
            rollout.validate()
        else:
            check_weight_sync(rollout, learner)
    assert err.value.key.endswith("weight_sync") and "Fix:" in str(err.value)
    if problem:
        assert problem in str(err.value)


# ------------------------------------------------------------------------------ what is sent


@pytest.fixture(scope="module")
def learner_model(tiny_qwen25):
    """The "learner": the tiny model with its vision tower frozen (learner.freeze_vision) and new weights."""
    from transformers import AutoModelForImageTextToText

    torch.manual_seed(0)
    model = AutoModelForImageTextToText.from_pretrained(tiny_qwen25)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p))
    model.get_submodule("model.visual").requires_grad_(False)
    return model


def test_only_trainable_parameters_are_sent(learner_model):
    """Metadata and tensors cover the trainable parameters, in one order, and none of the frozen vision tower.

    Mutant: ``trainable_only`` ignored (the vision tower travels every step)."""
    metadata = weight_sender.weight_metadata(learner_model, trainable_only=True)
    names = [m[0] for m in metadata]
    trainable = [n for n, p in learner_model.named_parameters(remove_duplicate=False) if p.requires_grad]
    assert names == trainable and not [n for n in names if n.startswith("model.visual")]
    sent = list(iter_full_weights(learner_model, partitioned=False, keep=True, bucket_numel=1 << 40, trainable_only=True))
    assert [n for n, _ in sent] == names
    assert weight_sender.payload_bytes(metadata) == sum(t.numel() * t.element_size() for _, t in sent)
    assert len(weight_sender.weight_metadata(learner_model, trainable_only=False)) > len(metadata)


def test_payload_bytes_and_metrics_by_hand():
    """2 x 3 bf16 (12 bytes) + 5 fp32 (20 bytes) = 32 bytes; 32 bytes in 2 s is 1.6e-8 GB/s.

    Mutant: bytes counted as elements (11)."""
    metadata = [("a", "bfloat16", [2, 3]), ("b", "float32", [5])]
    assert weight_sender.payload_bytes(metadata) == 32
    metrics = sync_metrics("nccl", metadata, engines=2, seconds=2.0, versions=[4, 4], gather_s=0.5)
    assert metrics == {"weights/bytes": 32.0, "weights/tensors": 2.0, "weights/engines": 2.0, "weights/sync_s": 2.0,
                       "weights/gb_per_s": 1.6e-8, "weights/path/nccl": 1.0, "weights/version": 4.0,
                       "weights/gather_s": 0.5}
    with pytest.raises(RuntimeError, match="different weight versions"):
        sync_metrics("nccl", metadata, 2, 1.0, [4, 5])


def test_sender_names_a_tensor_the_receivers_do_not_expect():
    """Both sides cut the packed stream from the metadata; a difference must be an error, not a hang.

    Mutant: ``checked`` passes tensors through unchecked."""
    metadata = [("a", "float32", [2]), ("b", "float32", [3])]
    good = [("a", torch.zeros(2)), ("b", torch.zeros(3))]
    assert [n for n, _ in weight_sender.checked(good, metadata)] == ["a", "b"]
    with pytest.raises(ValueError, match="tensor 1 is"):
        list(weight_sender.checked([("a", torch.zeros(2)), ("b", torch.zeros(4))], metadata))
    with pytest.raises(ValueError, match="sent 1 tensors"):
        list(weight_sender.checked(good[:1], metadata))


# ------------------------------------------------------------------------------ the NCCL group


@pytest.mark.vllm_api
def test_nccl_ranks_are_vllms_and_cover_the_group_once(vllm_api):
    """Every engine's init info is a valid ``NCCLWeightTransferInitInfo``, and with vLLM's own rank
    arithmetic (``_worker_group_rank``) the sender and every worker of every engine take each rank of
    the group exactly once.

    Mutant: every engine at rank offset 1 (engines of TP 4 collide on ranks 1-4)."""
    from vllm.distributed.weight_transfer.nccl_common import NCCLWeightTransferInitInfo, _worker_group_rank

    tps = [4, 4, 2]
    world, infos = nccl_layout(tps, "10.0.0.1", 29500, bucket_bytes=1 << 20)
    assert world == 11
    ranks = [0]
    for tp, info in zip(tps, infos):
        parsed = NCCLWeightTransferInitInfo(**info)
        assert (parsed.world_size, parsed.packed, parsed.packed_buffer_size_bytes) == (world, True, 1 << 20)
        for worker in range(tp):
            config = SimpleNamespace(data_parallel_index=0, world_size=tp, rank=worker)
            ranks.append(_worker_group_rank(parsed.rank_offset, config))
    assert sorted(ranks) == list(range(world))


@pytest.mark.vllm_api
def test_nccl_broadcast_reaches_every_engines_model(make_engine, learner_model, monkeypatch):
    """Learner rank 0's sender (vLLM's packed producer) and two engines (vLLM's NCCL receiver in the
    worker session, inside AsyncLLM's pause/resume) in one broadcast: each engine joins with its own
    rank, every trainable tensor lands in both models in buckets, the frozen vision tower is not sent,
    and both engines take the given version.

    Mutants: receivers given other buckets than the sender's (the streams are cut differently: a
    size mismatch); both engines at one rank offset (the second waits for a rank nobody feeds)."""
    from vllm.distributed.weight_transfer import nccl_common

    engines = [make_engine("nccl")[:2] for _ in range(2)]
    world, infos = nccl_layout([1, 1], "127.0.0.1", 29511, bucket_bytes=64 * 1024)
    link = vllm_standin.FakeNcclLink(world)
    monkeypatch.setattr(nccl_common, "stateless_init_process_group",
                        lambda address, port, rank, world_size, device: link.end(rank))
    vllm_standin.FakeCudaStreams.install(monkeypatch)
    metadata = weight_sender.weight_metadata(learner_model, trainable_only=True)
    vision_before = [dict(core.worker.model.named_parameters())["visual.blocks.0.attn.qkv.weight"].clone()
                     for _, core in engines]

    async def scenario():
        loop = asyncio.get_running_loop()
        opening = loop.run_in_executor(None, weight_sender.NcclWeightSender, "127.0.0.1", 29511, world, 64 * 1024)
        for (engine, _), info in zip(engines, infos):
            await engine.init_weight_transfer(info)
        sender = await opening
        tensors = iter_full_weights(learner_model, partitioned=False, keep=True, bucket_numel=1 << 40,
                                    trainable_only=True)
        sending = loop.run_in_executor(None, sender.send, tensors, metadata)
        versions = await asyncio.gather(*(engine.receive_weights(weight_sender.update_info(metadata), version=5)
                                          for engine, _ in engines))
        return versions, await sending

    versions, sent = asyncio.run(scenario())
    assert versions == [5, 5] and sent == link.sent_bytes == weight_sender.payload_bytes(metadata)
    assert link.broadcasts > 3  # bucketed
    new = dict(learner_model.named_parameters())
    for (engine, core), vision in zip(engines, vision_before):
        params = dict(core.worker.model.named_parameters())
        gate_up = params["language_model.model.layers.1.mlp.gate_up_proj.weight"]
        layer = "model.language_model.layers.1.mlp"
        expected = torch.cat([new[f"{layer}.gate_proj.weight"], new[f"{layer}.up_proj.weight"]]).to(gate_up.dtype)
        assert torch.equal(gate_up, expected)
        assert torch.equal(params["visual.blocks.0.attn.qkv.weight"], vision)  # not sent
        assert core.events[-3:] == ["finish_weight_update", "version(5)", "resume"] and engine.weight_version == 5


# ------------------------------------------------------------------------------ colocated IPC


@pytest.mark.vllm_api
def test_colocated_engine_reads_the_learners_own_parameters(make_engine, learner_model, monkeypatch):
    """IPC on a shared GPU: the handles point at the learner's parameters themselves (no staging copy)
    and vLLM's IPC receiver loads them into the real model; the frozen vision tower stays out.

    Mutant: handles of copies (``param.clone()``), which is what the object-store path does, not this one."""
    engine, core, ipc = make_engine("ipc")
    monkeypatch.setattr(weight_sender, "reduce_tensor", ipc.reduce_tensor)
    params = dict(learner_model.named_parameters())
    info, exported = weight_sender.ipc_update_info(learner_model, ipc.uuid)
    assert [t.data_ptr() for t in exported] == [params[n].data_ptr() for n in info["names"]]
    assert not [n for n in info["names"] if n.startswith("model.visual")]
    assert asyncio.run(engine.receive_weights(info, version=3)) == 3
    loaded = dict(core.worker.model.named_parameters())
    qkv = loaded["language_model.model.layers.0.self_attn.qkv_proj.weight"]
    layer = "model.language_model.layers.0.self_attn"
    assert torch.equal(qkv, torch.cat([params[f"{layer}.{x}_proj.weight"] for x in "qkv"]).to(qkv.dtype))
    del exported


# ------------------------------------------------------------------------------ coordinator refusals


class _Groups(SimpleNamespace):
    """Just enough of a LearnerGroup and a RolloutGroup for a sync's set-up checks."""

    def weight_metadata(self):
        return [("lm_head.weight", "bfloat16", [4, 4])]

    def health(self):
        return [{}] * len(self.endpoints)

    def weight_endpoints(self):
        return self.endpoints

    def gpu_uuid(self):
        return self.uuid


def test_ipc_refuses_engines_on_another_gpu():
    """Mutant: the GPU check dropped (vLLM's receiver fails mid-update: no handle for its GPU UUID)."""
    groups = _Groups(uuid="GPU-a", endpoints=[{"backend": "ipc", "gpu_uuids": ["GPU-a"]},
                                              {"backend": "ipc", "gpu_uuids": ["GPU-b"]}])
    with pytest.raises(RuntimeError, match=r"\(1, \['GPU-b'\]\)"):
        IpcSync(groups, groups, 1 << 20).setup()
    IpcSync(groups, _Groups(endpoints=groups.endpoints[:1]), 1 << 20).setup()


def test_nccl_refuses_engines_started_without_the_nccl_receiver():
    """Mutant: the backend check dropped (the rendezvous waits for workers that never join)."""
    groups = _Groups(uuid="GPU-a", endpoints=[{"backend": "ipc", "gpu_uuids": ["GPU-b"], "tensor_parallel_size": 1}])
    with pytest.raises(RuntimeError, match="NCCL receiver"):
        NcclSync(groups, groups, 1 << 20).setup()
