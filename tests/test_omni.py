"""Qwen3-Omni-MoE (the thinker) with images, audio and video, against transformers on a tiny random checkpoint.

The reference side is built independently of longmoe's preprocessing where transformers can run here: images through
`Qwen2VLImageProcessorPil`, audio through `WhisperFeatureExtractor`, placeholder counts from transformers' own
functions and the processor's video/audio interleaving. Video frames (transformers' video processor needs
torchvision, which does not run with this torch) are patched by the test with transformers' reshape/permute.
Tolerances: logits and log-probs within 1e-4 in fp32; greedy continuations equal.
"""

from __future__ import annotations

import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers as tf
from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

import longmoe
from longmoe import media as M
from longmoe import multimodal as MM
from longmoe.engine.engine import SamplingParams
from longmoe.multimodal import smart_resize

pytest.importorskip("av")
import omni_reference as R  # noqa: E402

FPS = 2.0


@pytest.fixture(scope="module")
def omni(tmp_path_factory):
    path = tmp_path_factory.mktemp("omni")
    ref = R.build(path)
    return path, ref


@pytest.fixture(scope="module")
def media():
    return {
        "image": {"mime_type": "image/png", "data": R.png(100, 130, seed=1)},
        "image2": {"mime_type": "image/png", "data": R.png(100, 130, seed=2)},
        "audio": {"mime_type": "audio/wav", "data": R.wav(1.7, 300.0, stereo=True)},
        "video": {"mime_type": "video/mp4", "data": R.mp4(9, 4, 96, 64, seed=3, audio=False)},  # 5 frames at 2 fps
        "video_av": {"mime_type": "video/mp4", "data": R.mp4(8, 4, 96, 64, seed=4, audio=True)},
    }


# ---------------------------------------------------------------------------------------------------------------------
# the reference: transformers' inputs for a list of parts


def reference_inputs(path: Path, parts: list) -> tuple[list[int], dict]:
    """Token ids as the Qwen3-Omni processor lays them out, and the thinker's keyword arguments."""
    from PIL import Image
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    p = R.PREPROCESSOR
    image_proc = image_processor(p["min_pixels"], p["max_pixels"])
    fe = tf.WhisperFeatureExtractor(feature_size=128)
    fake_proc = types.SimpleNamespace(audio_bos_token="<|audio_start|>", audio_eos_token="<|audio_end|>",
                                      video_token="<|video_pad|>", audio_token="<|audio_pad|>",
                                      video_processor=types.SimpleNamespace(merge_size=2))  # fmt: skip
    text, pixels, grids, vpixels, vgrids, feats = "", [], [], [], [], []
    any_video_audio = False
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        kind, data = M.modality(part["mime_type"]), part["data"]
        if kind == "image":
            out = image_proc(images=[Image.open(__import__("io").BytesIO(data)).convert("RGB")], return_tensors="pt")
            pixels.append(out["pixel_values"])
            grids.append(out["image_grid_thw"][0])
            text += "<|vision_start|>" + "<|image_pad|>" * int(out["image_grid_thw"][0].prod() // 4) + "<|vision_end|>"
        elif kind == "audio":
            f = features(fe, M.load_audio(data, 16000))
            feats.append(f)
            n = int(_get_feat_extract_output_lengths(torch.tensor(f.shape[1]), 50))
            text += "<|audio_start|>" + "<|audio_pad|>" * n + "<|audio_end|>"
        else:
            rows, grid = video_rows([f for _, f in M.video_frames(data, FPS)])
            vpixels.append(rows)
            vgrids.append(grid)
            track = M.video_audio(data, 16000)
            if len(track):
                any_video_audio = True
                f = features(fe, track)
                feats.append(f)
                n = int(_get_feat_extract_output_lengths(torch.tensor(f.shape[1]), 50))
                block = tf.Qwen3OmniMoeProcessor.replace_video_with_audio_token(
                    fake_proc, {"video_grid_thw": [grid.numpy()], "video_second_per_grid": [2 / FPS]}, 0,
                    {"num_audio_tokens": [n]}, 0, position_id_per_seconds=13,
                )  # fmt: skip
                text += "<|vision_start|>" + block + "<|vision_end|>"
            else:
                text += "<|vision_start|>" + "<|video_pad|>" * int(grid.prod() // 4) + "<|vision_end|>"
    ids = tok.encode(text).ids
    kw = {}
    if pixels:
        kw.update(pixel_values=torch.cat(pixels), image_grid_thw=torch.stack(grids))
    if vpixels:
        kw.update(pixel_values_videos=torch.cat(vpixels), video_grid_thw=torch.stack(vgrids),
                  video_second_per_grid=torch.tensor([2 / FPS] * len(vgrids)))  # fmt: skip
    if feats:
        longest = max(f.shape[1] for f in feats)
        kw["input_features"] = torch.stack([torch.nn.functional.pad(f, (0, longest - f.shape[1])) for f in feats])
        kw["feature_attention_mask"] = torch.stack(
            [(torch.arange(longest) < f.shape[1]).long() for f in feats]
        )  # fmt: skip
    kw["use_audio_in_video"] = any_video_audio
    return ids, kw


def image_processor(min_pixels: int, max_pixels: int):
    return tf.Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3,
                                       image_std=[0.5] * 3, min_pixels=min_pixels, max_pixels=max_pixels)  # fmt: skip


def features(fe, wave: np.ndarray) -> torch.Tensor:
    """One clip alone through WhisperFeatureExtractor, as the processor calls it: [128, frames]."""
    out = fe(wave, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True, return_tensors="pt")
    frames = int(out["attention_mask"][0].sum())
    return out["input_features"][0, :, :frames]


def video_rows(frames: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' Qwen2-VL video processing, written out: resize (bicubic), normalise, pad to a multiple of the
    temporal patch with the last frame, then `patchify`'s view and permute."""
    from PIL import Image

    h, w = smart_resize(frames[0].shape[0], frames[0].shape[1], 32, 128 * 32 * 32, 768 * 32 * 32)
    x = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.Resampling.BICUBIC), np.float32) for f in frames])
    x = torch.from_numpy((x / 255.0 - 0.5) / 0.5).permute(0, 3, 1, 2)[None]  # [1, F, 3, h, w]
    if pad := -x.shape[1] % 2:
        x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
    gt, gh, gw = x.shape[1] // 2, h // 16, w // 16
    x = x.view(1, gt, 2, 3, gh // 2, 2, 16, gw // 2, 2, 16).permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
    return x.reshape(gt * gh * gw, 3 * 2 * 16 * 16), torch.tensor([gt, gh, gw])


def ref_logits(ref, ids: list[int], kw: dict) -> torch.Tensor:
    with torch.no_grad():
        x = torch.tensor([ids])
        return ref.thinker(input_ids=x, attention_mask=torch.ones_like(x), **kw).logits[0]  # [T, V]


def ref_greedy(ref, ids: list[int], kw: dict, n: int) -> list[int]:
    """Greedy decoding by re-scoring the whole sequence each step (positions after the prompt continue from the
    M-RoPE delta, as transformers' generation does)."""
    out = []
    for _ in range(n):
        out.append(int(ref_logits(ref, ids + out, kw)[-1].argmax()))
    return out


# ---------------------------------------------------------------------------------------------------------------------


PROMPTS = {
    "image": lambda m: ["Look at this: ", m["image"], " What is the special magic number?"],
    "audio": lambda m: ["Listen: ", m["audio"], " The key value cache keeps them."],
    "video": lambda m: ["Watch: ", m["video"], " Long context models read"],
    "video_with_audio": lambda m: ["Watch and listen: ", m["video_av"], " the needle"],
    "interleaved": lambda m: ["A ", m["image"], " then ", m["audio"], " and ", m["video_av"], " and ", m["image2"],
                              " last."],  # fmt: skip
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_prompt_layout_logits_and_greedy_match_transformers(omni, media, case):
    path, ref = omni
    parts = PROMPTS[case](media)
    ids, kw = reference_inputs(path, parts)
    m = longmoe.load(path, dtype="float32", chunk_size=4096)
    prompt = m.prepare(parts, video_fps=FPS)
    assert prompt.tokens == ids  # the processor's placeholder layout, exactly
    assert m.count_tokens(parts, video_fps=FPS) == len(ids)
    counts = m.token_counts(parts, video_fps=FPS)
    assert sum(counts.values()) == len(ids) and counts["text"] < len(ids)
    expected = ref_logits(ref, ids, kw)
    # every prompt position, through the engine (scoring), against the reference's log-probabilities
    seq = m.engine.submit(ids, SamplingParams(max_new_tokens=1, prompt_logprobs=True), prompt)
    m.engine.run(seq)
    seq.raise_error()
    want = torch.log_softmax(expected, -1)[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    assert torch.allclose(torch.tensor(seq.prompt_logprobs), want, atol=1e-4), (
        (torch.tensor(seq.prompt_logprobs) - want).abs().max()
    )
    # the logits themselves, from the model run on the prompt's inputs (embeddings placed, M-RoPE, DeepStack)
    with torch.no_grad():
        x = m.module.embed_tokens(torch.tensor([ids]))
        x[0, prompt.embed_index] = prompt.embeds
        deep = []
        for feats in prompt.deepstack:
            deep.append(torch.zeros_like(x))
            deep[-1][0, prompt.visual_index] = feats
        logits = m.module(input_embeds=x, rope_positions=prompt.rope_positions[:, None], deepstack=deep).logits[0]
    assert torch.allclose(logits, expected, atol=1e-4), (logits - expected).abs().max()
    out = m.generate(parts, max_new_tokens=6, video_fps=FPS)
    assert out.token_ids == ref_greedy(ref, ids, kw, 6)
    assert out.usage.prompt_tokens == len(ids)
    assert "".join(m.stream(parts, max_new_tokens=6, video_fps=FPS)) == out.text


def test_chunked_prefill_splitting_media_equals_one_shot(omni, media):
    path, _ = omni
    parts = PROMPTS["interleaved"](media)
    one = longmoe.load(path, dtype="float32", chunk_size=4096)
    chunked = longmoe.load(path, dtype="float32", chunk_size=13, block_size=16)  # cuts through every media block
    a = one.generate(parts, max_new_tokens=8, logprobs=True, video_fps=FPS)
    b = chunked.generate(parts, max_new_tokens=8, logprobs=True, video_fps=FPS)
    assert a.token_ids == b.token_ids
    assert np.allclose(a.logprobs, b.logprobs, atol=1e-4)


def test_prefix_cache_keys_media_by_content(omni, media):
    path, _ = omni
    m = longmoe.load(path, dtype="float32", block_size=16)
    cold = longmoe.load(path, dtype="float32", block_size=16)
    first = m.generate(PROMPTS["image"](media), max_new_tokens=5)
    again = m.generate(PROMPTS["image"](media), max_new_tokens=5)
    assert again.usage.cached_tokens > 0 and again.token_ids == first.token_ids  # a repeated image hits the cache
    other = ["Look at this: ", media["image2"], " What is the special magic number?"]  # same size, other pixels
    hit = m.generate(other, max_new_tokens=5)
    assert hit.usage.cached_tokens < 16  # nothing past the first block (plain text) may be reused
    assert hit.token_ids == cold.generate(other, max_new_tokens=5).token_ids


def test_preprocessing_equals_transformers(media):
    from PIL import Image

    spec = MM.MediaSpec(0, 1, 2, 3, 4, 5, 6, min_pixels=3136, max_pixels=12845056)
    img = Image.open(__import__("io").BytesIO(media["image"]["data"])).convert("RGB")
    ours, grid = MM.image_patches(media["image"]["data"], spec)
    theirs = image_processor(3136, 12845056)(images=[img])
    assert list(grid) == list(theirs["image_grid_thw"][0]) and np.array_equal(ours, theirs["pixel_values"])
    wave = M.load_audio(media["audio"]["data"], 16000)
    assert torch.allclose(MM.log_mel(wave, spec), features(tf.WhisperFeatureExtractor(feature_size=128), wave),
                          atol=1e-5)  # fmt: skip
    frames = [f for _, f in M.video_frames(media["video"]["data"], FPS)]
    rows = [r for r, _ in MM.video_patches(frames, spec)]
    want, grid = video_rows(frames)
    assert np.allclose(np.concatenate(rows), want.numpy(), atol=1e-6) and grid[0] == len(rows)


def test_bad_media_is_refused_naming_the_part(omni):
    path, _ = omni
    m = longmoe.load(path, dtype="float32")
    with pytest.raises(M.MediaError, match="part 1 .*image/png.*does not decode"):
        m.generate(["x", {"mime_type": "image/png", "data": b"not a png"}], max_new_tokens=1)
    with pytest.raises(M.MediaError, match="unsupported media type"):
        m.count_tokens(["x", {"mime_type": "application/zip", "data": b"PK"}])
    with pytest.raises(M.MediaError, match="part 1: expected text"):
        m.count_tokens(["x", 3.5])
    text_only = longmoe.load()  # the bundled model reads text only
    with pytest.raises(M.MediaError, match="reads text only"):
        text_only.count_tokens(["x", {"mime_type": "image/png", "data": R.png(32, 32, 0)}])


def test_cli_generate_takes_media_parts_in_order(omni, media, tmp_path):
    import subprocess
    import sys

    path, _ = omni
    (tmp_path / "a.png").write_bytes(media["image"]["data"])
    (tmp_path / "b.wav").write_bytes(media["audio"]["data"])
    want = longmoe.load(path, dtype="float32").generate(
        ["Look ", Path(tmp_path / "a.png"), " and ", Path(tmp_path / "b.wav"), " What?"], max_new_tokens=5
    )
    cmd = [sys.executable, "-m", "longmoe.cli", "generate", "--model", str(path), "--dtype", "float32", "--text",
           "Look ", "--image", str(tmp_path / "a.png"), "--text", " and ", "--audio", str(tmp_path / "b.wav"),
           "--prompt", " What?", "--max-new-tokens", "5"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.rstrip("\n") == want.text
    bad = subprocess.run(cmd[:-4] + ["--video", str(tmp_path / "missing.mp4"), "--prompt", "x"], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert bad.returncode == 2 and "missing.mp4" in bad.stderr and "does not exist" in bad.stderr


# ---------------------------------------------------------------------------------------------------------------------
# the Gemini API with media, through the official client (google-genai, unmodified)


@pytest.fixture(scope="module")
def omni_server(omni, tmp_path_factory):
    from serve_harness import ServerProcess

    srv = ServerProcess(omni[0], tmp_path_factory.mktemp("omni-data"), "--dtype", "float32", name="omni")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def gclient(omni_server):
    from google import genai
    from google.genai import types
    from serve_harness import KEY

    return genai.Client(api_key=KEY, http_options=types.HttpOptions(base_url=omni_server.url, timeout=300_000))


def _config(n: int = 6):
    from google.genai import types

    return types.GenerateContentConfig(max_output_tokens=n, temperature=0)


def test_gemini_api_inline_media_equals_the_python_api(omni, media, gclient):
    from google.genai import types

    path, _ = omni
    local = longmoe.load(path, dtype="float32")
    parts = ["Look: ", media["image"], " and listen: ", media["audio"], " and watch: ", media["video_av"], " What?"]
    want = local.generate(parts, max_new_tokens=6)
    contents = [types.Part.from_text(text="Look: "),
                types.Part.from_bytes(data=media["image"]["data"], mime_type="image/png"),
                types.Part.from_text(text=" and listen: "),
                types.Part.from_bytes(data=media["audio"]["data"], mime_type="audio/wav"),
                types.Part.from_text(text=" and watch: "),
                types.Part.from_bytes(data=media["video_av"]["data"], mime_type="video/mp4"),
                types.Part.from_text(text=" What?")]  # fmt: skip
    got = gclient.models.generate_content(model="omni", contents=contents, config=_config())
    assert got.text == want.text
    u = got.usage_metadata
    counts = local.token_counts(parts)
    assert u.prompt_token_count == sum(counts.values()) == want.usage.prompt_tokens
    assert {d.modality.name: d.token_count for d in u.prompt_tokens_details} == {
        k.upper(): n for k, n in counts.items() if n
    }
    streamed = "".join(c.text or "" for c in gclient.models.generate_content_stream(
        model="omni", contents=contents, config=_config()))  # fmt: skip
    assert streamed == want.text
    assert gclient.models.count_tokens(model="omni", contents=contents).total_tokens == want.usage.prompt_tokens


def test_gemini_api_uploaded_video_with_metadata_and_cache(omni, media, gclient, omni_server):
    import io

    import httpx
    from google.genai import types
    from serve_harness import KEY, wait_until

    path, _ = omni
    local = longmoe.load(path, dtype="float32")
    for kind, mime in (("image", "image/png"), ("audio", "audio/wav")):  # uploaded image and audio files
        up = gclient.files.upload(file=io.BytesIO(media[kind]["data"]), config=types.UploadFileConfig(mime_type=mime))
        up = wait_until(lambda u=up: (g := gclient.files.get(name=u.name)).state.name == "ACTIVE" and g, what=kind)
        ask = types.Content(role="user", parts=[types.Part(file_data=types.FileData(file_uri=up.uri, mime_type=mime)),
                                                types.Part.from_text(text=" What?")])  # fmt: skip
        answer = gclient.models.generate_content(model="omni", contents=ask, config=_config())
        assert answer.text == local.generate([media[kind], " What?"], max_new_tokens=6).text
        assert [d.modality.name for d in answer.usage_metadata.prompt_tokens_details] == ["TEXT", kind.upper()]
    f = gclient.files.upload(file=io.BytesIO(media["video_av"]["data"]), config=types.UploadFileConfig(
        mime_type="video/mp4"))  # fmt: skip
    assert f.state.name in ("PROCESSING", "ACTIVE")
    f = wait_until(lambda: (g := gclient.files.get(name=f.name)).state.name == "ACTIVE" and g, what="ACTIVE")
    clip = types.Part(file_data=types.FileData(file_uri=f.uri, mime_type="video/mp4"),
                      video_metadata=types.VideoMetadata(start_offset="0.5s", end_offset="1.9s", fps=2.0))  # fmt: skip
    want = local.generate(["Watch: ", dict(media["video_av"], start_offset=0.5, end_offset=1.9, fps=2.0), " now"],
                          max_new_tokens=6)  # fmt: skip
    turn = types.Content(role="user", parts=[types.Part.from_text(text="Watch: "), clip,
                                             types.Part.from_text(text=" now")])  # fmt: skip
    got = gclient.models.generate_content(model="omni", contents=turn, config=_config())
    assert got.text == want.text and got.usage_metadata.prompt_token_count == want.usage.prompt_tokens
    # context caching with media: the cached video's KV is reused by a request naming the cache
    first = types.Content(role="user", parts=[types.Part.from_text(text="Watch: "), clip])
    cache = gclient.caches.create(model="omni", config=types.CreateCachedContentConfig(contents=[first], ttl="600s"))
    hit = gclient.models.generate_content(model="omni", contents=" now", config=types.GenerateContentConfig(
        cached_content=cache.name, max_output_tokens=6, temperature=0))  # fmt: skip
    # two turns: the plain template (this model has no chat template) puts a blank line between them
    two = local.generate(["Watch: ", dict(media["video_av"], start_offset=0.5, end_offset=1.9, fps=2.0), "\n\n now"],
                         max_new_tokens=6)  # fmt: skip
    assert hit.text == two.text and hit.usage_metadata.prompt_token_count == two.usage.prompt_tokens
    assert hit.usage_metadata.cached_content_token_count >= 16  # at least the blocks before the question
    # undecodable media: a 400 naming the part; the file that fails its check is FAILED
    not_png = {"inline_data": {"mime_type": "image/png", "data": "bm90IGFuIGltYWdl"}}
    bad = httpx.post(f"{omni_server.url}/v1beta/models/omni:generateContent", headers={"x-goog-api-key": KEY},
                     json={"contents": [{"parts": [{"text": "x"}, not_png]}]})  # fmt: skip
    assert bad.status_code == 400 and "contents[0].parts[1].inlineData" in bad.text and "does not decode" in bad.text
    odd = httpx.post(f"{omni_server.url}/v1beta/models/omni:countTokens", headers={"x-goog-api-key": KEY},
                     json={"contents": [{"parts": [{"inlineData": {"mimeType": "application/zip", "data": "UEs="}}]}]})
    assert odd.status_code == 400 and "application/zip" in odd.text
    broken = gclient.files.upload(file=io.BytesIO(b"\x00\x00\x00\x18ftypmp42 not really"),
                                  config=types.UploadFileConfig(mime_type="video/mp4"))  # fmt: skip
    failed = wait_until(lambda: (g := gclient.files.get(name=broken.name)).state.name != "PROCESSING" and g,
                        what="the check")  # fmt: skip
    assert failed.state.name == "FAILED" and failed.error.message
    use = httpx.post(f"{omni_server.url}/v1beta/models/omni:generateContent", headers={"x-goog-api-key": KEY},
                     json={"contents": [{"parts": [{"fileData": {"fileUri": broken.uri}}]}]})
    assert use.status_code == 400 and "FAILED" in use.text
    assert httpx.get(f"{omni_server.url}/healthz").status_code == 200


def test_long_audio_streams_in_blocks_and_windows_exactly(omni):
    """Long audio never sits decoded in one array: features come block by block (two passes: the clip's maximum,
    then the features), and the encoder runs one 8-s attention window at a time. Both equal the whole-clip forms."""
    path, _ = omni
    spec = MM.MediaSpec(0, 1, 2, 3, 4, 5, 6)
    wave = np.concatenate([R.tone(7.3, 300.0, 16000), R.tone(9.0, 520.0, 16000) * 0.2, R.tone(5.05, 90.0, 16000)])
    whole = features(tf.WhisperFeatureExtractor(feature_size=128), wave)  # [128, 2135]
    blocks = lambda: (wave[i : i + 4999] for i in range(0, len(wave), 4999))  # noqa: E731
    total, segments = MM.audio_features(blocks, spec, segment=800)
    segments = list(segments)
    assert total == whole.shape[1] and [s.shape[1] for s in segments] == [800, 800, 535]
    assert torch.allclose(torch.cat(segments, dim=1), whole, atol=1e-5)
    tower = longmoe.load(path, dtype="float32").checkpoint.encoders.audio_tower
    with torch.no_grad():
        at_once = tower(whole)
        windowed = torch.cat([tower(s, clip_frames=total) for s in segments])
    assert at_once.shape[0] == 104 * 2 + 70 and torch.allclose(at_once, windowed, atol=1e-5)


def test_video_patches_are_the_image_path_per_frame_pair(media):
    """A temporal patch of two frames is the image path's patch rows with the two frames in the time slots (an
    image is a pair of equal frames)."""
    from PIL import Image

    spec = MM.MediaSpec(0, 1, 2, 3, 4, 5, 6)
    frames = [f for _, f in M.video_frames(media["video"]["data"], FPS)]
    pairs = list(MM.video_patches(frames, spec))
    h, w = smart_resize(*frames[0].shape[:2], 32, spec.video_min_pixels, spec.video_max_pixels)
    image_spec = MM.MediaSpec(0, 1, 2, 3, 4, 5, 6, min_pixels=3136, max_pixels=h * w)

    def as_image(frame):  # a frame at the video's size: the image path keeps it (sides are multiples of 32)
        return Image.fromarray(frame).resize((w, h), Image.Resampling.BICUBIC)

    for k, (rows, grid) in enumerate(pairs):
        a, b = frames[2 * k], frames[min(2 * k + 1, len(frames) - 1)]  # an odd last frame is repeated
        ra, ga = MM.image_patches(as_image(a), image_spec)
        rb, _ = MM.image_patches(as_image(b), image_spec)
        assert grid == ga
        # rows are (C, T, P, P): time slot 0 from frame a, slot 1 from frame b
        got = rows.reshape(-1, 3, 2, 256)
        assert np.array_equal(got[:, :, 0], ra.reshape(-1, 3, 2, 256)[:, :, 0])
        assert np.array_equal(got[:, :, 1], rb.reshape(-1, 3, 2, 256)[:, :, 1])
