"""Golden parity of the integer window arithmetic (chunking.py) and the schedule numerics (sampling.py).

Covers every tensor of schedules.safetensors, every case of schedules.json, and the per-call logs of all six
sampler fixtures in manifest.json (window bookkeeping, timesteps, flags, kv ranges, caption rows, emitted chunks).
"""
from __future__ import annotations

import json
import re

import pytest
import torch

from magi_server.runtime import chunking
from magi_server.runtime import timesteps as sampling


@pytest.fixture(scope="module")
def schedules(golden):
    return json.loads((golden / "schedules.json").read_text())


@pytest.fixture(scope="module")
def manifest(golden):
    return json.loads((golden / "manifest.json").read_text())


def _ulp_distance(a: torch.Tensor, b: torch.Tensor) -> int:
    assert a.dtype == b.dtype == torch.float32 and a.shape == b.shape
    return (a.view(torch.int32).long() - b.view(torch.int32).long()).abs().max().item()


# --------------------------------------------------------------------------------------------------------------------
# schedules.safetensors
# --------------------------------------------------------------------------------------------------------------------


def _schedule_args(name: str):
    kind, *rest = name.split(".")
    steps = int(rest[-2][len("steps"):])
    mode = rest[-1][len("mode"):].replace("_", ",")
    return kind, rest[0] if kind == "init_t" else None, steps, mode


def test_schedule_tensors(golden):
    from safetensors.torch import load_file

    tensors = load_file(str(golden / "schedules.safetensors"))
    assert len(tensors) == 31
    for name, expected in tensors.items():
        kind, func, steps, mode = _schedule_args(name)
        if kind == "init_t":
            shift = 2.0 if func == "sd3shift2" else 3.0
            actual = sampling.init_t(steps, mode, "sd3" if func.startswith("sd3") else func, shift)
            assert actual.dtype == torch.float32
            assert _ulp_distance(actual, expected) <= 1, name
            if func == "sd3":
                assert actual[-1].view(torch.int32).item() == 0x3F800001, name
        else:
            actual = sampling.init_interval(steps, mode)
            assert actual.dtype == expected.dtype, name
            assert torch.equal(actual, expected), name


def test_init_t_special_values():
    t8 = sampling.init_t(8)
    assert t8[4].view(torch.int32).item() == 0x3DCCCCCE
    assert t8[6].item() == torch.tensor(0.3, dtype=torch.float32).item()
    assert sampling.nearly_clean(t8[6])  # fl32(0.3) > 0.3
    with pytest.raises(ValueError):
        sampling.init_t(8, schedule="cosine")
    with pytest.raises(ValueError):
        sampling.init_t(8, shortcut_mode="8,8,8")


def test_schedule_json_lists(schedules):
    for key, values in schedules["init_t"].items():
        steps, mode = key.split("|")
        actual = sampling.init_t(int(steps), mode)
        assert _ulp_distance(actual, torch.tensor(values, dtype=torch.float32)) <= 1, key
    for key, values in schedules["init_intervel"].items():
        steps, mode = key.split("|")
        assert sampling.init_interval(int(steps), mode).tolist() == values, key


def test_distill_dt():
    assert sampling.distill_dt(16) == 8.0
    assert sampling.distill_dt(8) == 4.0
    assert sampling.distill_dt(64) == 32.0
    intervals = sampling.init_interval(12, "8,16,16")
    assert [sampling.distill_dt(12, intervals[d]) for d in range(3)] == [4.0, 8.0, 8.0]


# --------------------------------------------------------------------------------------------------------------------
# schedules.json: window schedule, step indices, kv ranges, cfg buckets
# --------------------------------------------------------------------------------------------------------------------


def test_generate_sequences(schedules):
    assert len(schedules["generate_sequences"]) == 11
    for case in schedules["generate_sequences"]:
        stages = chunking.stage_schedule(case["chunk_num"], case["window_size"], case["chunk_offset"])
        # the reference's four lists (chunk_start, chunk_end, t_start, t_end), one entry per stage
        lists = tuple([getattr(st, name) for st in stages] for name in ("chunk_start", "chunk_end", "t_start", "t_end"))
        assert lists == (case["clip_start"], case["clip_end"], case["t_start"], case["t_end"]), case
        for stage in chunking.stage_schedule(case["chunk_num"], case["window_size"], case["chunk_offset"]):
            assert stage.num_window_chunks == stage.t_end - stage.t_start


def _kv_case_config(name: str):
    match = re.search(r"noise2clean\[([0-9,]*)\]_(clean(-?\d+)|default)", name)
    assert match, name
    noise2clean = tuple(int(v) for v in match.group(1).split(",") if v)
    clean = int(match.group(3)) if match.group(3) is not None else 1
    return noise2clean, clean


def test_kv_ranges(schedules):
    cases = schedules["kv_ranges"]
    assert len(cases) == 32
    for case in cases:
        noise2clean, clean = _kv_case_config(case["case"])
        tpc = case["chunk_token_nums"]
        expected = tuple(tuple(r) for r in case["k_range"])
        if case["case"].endswith("|prefix_video"):
            actual = chunking.prefix_kv_ranges(case["range_num"], tpc, noise2clean, clean)
        else:
            assert len(case["denoise_step_of_each_chunk"]) == case["denoising_range_num"]
            actual = chunking.denoising_kv_ranges(
                case["slice_point"], case["denoise_step_of_each_chunk"], tpc, case["num_steps"], noise2clean, clean
            )
        assert actual == expected, case


def test_prefix_kv_ranges_empty_list_clean_minus_one():
    assert chunking.prefix_kv_ranges(10, 1, (), -1) == tuple((max(0, e - 8), e) for e in range(1, 11))


def test_uncond_kv_ranges(schedules):
    case = schedules["kv_range_for_uncondition"]
    n, _, frames, h, w = case["uncond_x_shape"]
    tpc = chunking.tokens_per_chunk(h, w, chunk_width=frames)
    assert chunking.uncond_kv_ranges(n, tpc) == tuple(tuple(r) for r in case["k_range"])


def test_timesteps_and_step_indices(schedules):
    for case in schedules["timesteps"]:
        num_steps = case["num_steps"]
        steps = chunking.chunk_step_indices(
            case["t_start"], case["t_end"], case["denoise_step_per_stage"], case["denoise_idx"],
            extra_clean_chunk=case["has_clean_t"], num_steps=num_steps,
        )
        assert list(steps) == case["denoise_step_of_each_chunk"], case
        window = steps[1:] if case["has_clean_t"] else steps
        t = sampling.chunk_timesteps(sampling.init_t(num_steps), window, 0.9999 if case["has_clean_t"] else None)
        assert t.dtype == torch.float32
        assert torch.equal(t, torch.tensor(case["timestep"], dtype=torch.float32)), case


def test_cfg_scales(schedules):
    cfg = dict(cfg_t_range=(0.0, 0.0217, 0.1, 0.3, 0.999), prev_chunk_scales=(1.5, 1.5, 1.5, 1.0, 1.0),
               text_scales=(7.5, 7.5, 7.5, 0.0, 0.0))
    for case in schedules["cfg_scale"]:
        prev, text = sampling.cfg_scales(case["t"], **cfg)
        assert (prev, text) == (case["prev_chunk_scale"], case["text_scale"]), case
        prev_t, text_t = sampling.cfg_scales(torch.tensor(case["t"], dtype=torch.float32), **cfg)
        assert prev_t.dtype == torch.float32 and prev_t.shape == ()
        assert (prev_t.item(), text_t.item()) == (case["prev_chunk_scale"], case["text_scale"]), case
    # batch of ts, and the fl32(0.3) schedule value lands in the upper bucket
    ts = sampling.init_t(8)[[4, 6]]
    prev, text = sampling.cfg_scales(ts, **cfg)
    assert prev.tolist() == [1.5, 1.0] and text.tolist() == [7.5, 0.0]


def test_cfg_bucket_edges_fp32_neighbours():
    """Each edge e is lowered to fl32(fl32(e) - 1e-7); t equal to that value stays below, the next float is above."""
    table = (0.0, 0.0217, 0.1, 0.3, 0.999)
    prev = (0.0, 1.0, 2.0, 3.0, 4.0)
    for k, edge in enumerate(table[1:], start=1):
        lowered = torch.tensor(edge, dtype=torch.float32) - torch.tensor(1e-7, dtype=torch.float32)
        above = torch.nextafter(lowered, torch.tensor(2.0))
        assert sampling.cfg_scales(lowered, table, prev, prev)[0].item() == k - 1
        assert sampling.cfg_scales(above, table, prev, prev)[0].item() == k
        assert sampling.cfg_scales(torch.tensor(edge, dtype=torch.float32), table, prev, prev)[0].item() == k
    with pytest.raises(ValueError):
        sampling.cfg_scales(-1.0, table, prev, prev)


def test_euler_step_per_chunk():
    x = torch.zeros(1, 2, 12, 1, 1)
    v = torch.ones(1, 2, 12, 1, 1)
    t = sampling.init_t(8)
    out = sampling.euler_step(x, v, t[[7, 3]], t[[8, 4]])
    assert torch.equal(out[:, :, :6], (t[8] - t[7]).expand(1, 2, 6, 1, 1))
    assert torch.equal(out[:, :, 6:], (t[4] - t[3]).expand(1, 2, 6, 1, 1))
    assert torch.equal(sampling.euler_step(x, v, 0.25, 0.5), torch.full_like(x, 0.25))


# --------------------------------------------------------------------------------------------------------------------
# Chunk counts and emitted frames
# --------------------------------------------------------------------------------------------------------------------


def test_chunk_layouts():
    t2v = chunking.chunk_layout(96)
    assert (t2v.num_chunks, t2v.num_clean_chunks, t2v.emitted_latent_frames()) == (4, 0, 24)
    assert chunking.chunk_layout(100).num_chunks == 5
    i2v = chunking.chunk_layout(96, prefix_frames=1)
    assert (i2v.num_chunks, i2v.num_clean_chunks, i2v.emitted_frames(0)) == (5, 0, (0, 6))
    assert i2v.emitted_latent_frames() == 30
    v2v = chunking.chunk_layout(96, prefix_frames=8)
    assert (v2v.num_chunks, v2v.num_clean_chunks) == (6, 1)
    assert v2v.emitted_frames(0) is None and v2v.emitted_frames(1) == (8, 12) and v2v.emitted_frames(5) == (30, 36)
    short = chunking.chunk_layout(72, prefix_frames=3)
    assert (short.num_chunks, short.num_clean_chunks, short.emitted_frames(0)) == (4, 0, (3, 6))
    with pytest.raises(ValueError):
        chunking.chunk_layout(0)


def test_plan_worked_example():
    """Spec §6.4: t2v, 4 chunks, window 4."""
    plan = chunking.plan_sampler_calls(chunking.chunk_layout(96), num_steps=16, window_size=4, tokens_per_chunk=1)
    assert plan.num_calls == 28 and plan.prefix_call is None
    windows = [(st.chunk_start, st.chunk_end) for st in plan.stages]
    assert windows == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
    extra = [c.index for c in plan.calls if c.extra_clean_chunk]
    assert extra == [16, 20, 24]
    emitted = [(c.index, c.emitted.chunk) for c in plan.calls if c.emitted]
    assert emitted == [(15, 0), (19, 1), (23, 2), (27, 3)]
    call16 = plan.calls[16]
    assert call16.slot_chunks == (0, 1, 2, 3) and call16.window_step_indices == (12, 8, 4)
    assert call16.kv_ranges == ((0, 1), (0, 2), (0, 3), (0, 4))
    assert plan.calls[20].kv_ranges == ((1, 2), (1, 3), (1, 4))


def test_plan_rejects_bad_steps():
    layout = chunking.chunk_layout(96)
    with pytest.raises(ValueError):
        chunking.plan_sampler_calls(layout, num_steps=10, window_size=4, tokens_per_chunk=1)
    with pytest.raises(ValueError):
        chunking.plan_sampler_calls(layout, num_steps=6, window_size=2, tokens_per_chunk=1)


# --------------------------------------------------------------------------------------------------------------------
# Sampler call logs (manifest.json)
# --------------------------------------------------------------------------------------------------------------------

SAMPLER_FIXTURES = (
    "sampler_A_t2v",
    "sampler_A_v2v",
    "sampler_B_t2v_distill",
    "sampler_B_i2v_distill",
    "sampler_B_t2v_distill_w4",
    "sampler_A_v2v_short_prefix",
)


def _fixture_setup(golden, entry):
    from magi_server.models.config import MagiConfig

    config = MagiConfig.from_json(golden / entry["config"])
    sampling_cfg = config.sampling
    num_frames = entry.get("runtime_override", {}).get("num_frames", sampling_cfg.num_frames)
    prefix = entry["tensors"].get("prefix_video")
    prefix_frames = prefix["shape"][2] if prefix else 0
    layout = chunking.chunk_layout(num_frames, prefix_frames, sampling_cfg.chunk_width,
                                   sampling_cfg.temporal_downsample_factor)
    tpc = chunking.tokens_per_chunk(sampling_cfg.video_size_h // 8, sampling_cfg.video_size_w // 8,
                                    sampling_cfg.chunk_width, config.dit.patch_size)
    plan = chunking.plan_sampler_calls(
        layout,
        num_steps=sampling_cfg.num_steps,
        window_size=sampling_cfg.window_size,
        tokens_per_chunk=tpc,
        noise2clean_kvrange=sampling_cfg.noise2clean_kvrange,
        clean_chunk_kvrange=sampling_cfg.clean_chunk_kvrange,
    )
    return config, layout, plan


def _ts(values):
    return torch.tensor(values, dtype=torch.float32)


@pytest.mark.parametrize("name", SAMPLER_FIXTURES)
def test_sampler_call_log(golden, manifest, name):
    entry = manifest["files"][f"{name}.safetensors"]
    config, layout, plan = _fixture_setup(golden, entry)
    s = config.sampling
    assert layout.num_chunks == entry["chunk_num"]
    assert [layout.latent_frames] == entry["latent_size"][2:3]
    assert plan.num_steps == entry["num_steps"]

    schedule = sampling.init_t(s.num_steps, s.shortcut_mode)
    intervals = sampling.init_interval(s.num_steps, s.shortcut_mode)
    logged = list(entry["calls"])

    # the prefix-extraction call comes first and carries no nearly-clean flag
    if plan.prefix_call is not None:
        first = logged.pop(0)
        pc = plan.prefix_call
        assert first["extract_prefix_video_feature"] is True
        assert "distill_nearly_clean_chunk" not in first
        assert (first["slice_point"], first["range_num"], first["denoising_range_num"]) == (
            pc.slice_point, pc.range_num, pc.denoising_range_num)
        assert first["fwd_extra_1st_chunk"] is False
        assert first["x_shape"][2] == pc.frame_end
        assert first["kv_range"] == [list(r) for r in pc.kv_ranges]
        assert torch.equal(_ts(first["timestep"]), torch.full((pc.num_chunks,), s.clean_t, dtype=torch.float32))
        assert first["distill_interval"] == intervals[pc.step_in_stage].item()
    assert not any("extract_prefix_video_feature" in c for c in logged)

    assert len(logged) == plan.num_calls
    for call, log in zip(plan.calls, logged):
        where = f"{name} call {log['call']}"
        assert call.slice_point == log["slice_point"], where
        assert call.range_num == log["range_num"], where
        assert call.denoising_range_num == log["denoising_range_num"], where
        assert call.extra_clean_chunk == log["fwd_extra_1st_chunk"], where
        assert log["x_shape"][2] == call.denoising_range_num * layout.chunk_width, where
        assert [list(r) for r in call.kv_ranges] == log["kv_range"], where
        t = sampling.chunk_timesteps(schedule, call.window_step_indices, s.clean_t if call.extra_clean_chunk else None)
        assert torch.equal(t, _ts(log["timestep"])), where
        flag = sampling.nearly_clean(t[call.first_denoising_slot], s.distill_nearly_clean_chunk_threshold)
        assert flag == log["distill_nearly_clean_chunk"], where
        assert intervals[call.step_in_stage].item() == log["distill_interval"], where
        assert log["num_steps"] == s.num_steps and log["chunk_width"] == layout.chunk_width, where

    yielded = [{"chunk_idx": e.index, "frames": e.num_frames} for e in plan.emissions]
    assert yielded == entry["yielded_chunks"]
    clean_latents = entry["tensors"]["clean_latents"]["shape"]
    assert clean_latents[2] == sum(e.num_frames for e in plan.emissions) == layout.emitted_latent_frames()


@pytest.mark.parametrize("name", SAMPLER_FIXTURES)
def test_sampler_caption_rows(golden, manifest, name):
    """The caption tensors built for the sampler, and the rows each call takes from them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from magi_server.models.text_encoder import CaptionTokenOptions, SpecialTokens, build_chunk_captions

    entry = manifest["files"][f"{name}.safetensors"]
    config, layout, plan = _fixture_setup(golden, entry)
    data = load_file(str(golden / f"{name}.safetensors"))
    weights_file = "dit_A_weights.safetensors" if entry["config"] == "config_A.json" else "dit_B_weights.safetensors"
    with safe_open(str(golden / weights_file), "pt") as f:
        null_caption = f.get_tensor("y_embedder.null_caption_embedding").float()
    tokens = SpecialTokens.load(golden / "sampler_tiny_special_tokens.safetensors")

    y, masks = build_chunk_captions(
        data["caption_embs"], data["emb_masks"], null_caption, layout.num_chunks, layout.num_clean_chunks,
        tokens, CaptionTokenOptions(),
    )
    assert torch.equal(masks, data["inference_input.emb_masks"])
    if "inference_input.y" in data:
        assert torch.equal(y, data["inference_input.y"])

    logged = list(entry["calls"])
    if plan.prefix_call is not None:
        first = logged.pop(0)
        rows = [masks[1, c] for c in range(plan.prefix_call.num_chunks)] * 2
        assert [int(r.sum()) for r in rows] == first["mask_valid_tokens"]
    for call, log in zip(plan.calls, logged):
        cond = [masks[1, 1] if (call.extra_clean_chunk and slot == 0) else masks[0, c]
                for slot, c in enumerate(call.slot_chunks)]
        null = [masks[1, c] for c in call.slot_chunks]
        assert [int(r.sum()) for r in cond + null] == log["mask_valid_tokens"], f"{name} call {log['call']}"
        assert log["y_rows"] == 2 * call.denoising_range_num
