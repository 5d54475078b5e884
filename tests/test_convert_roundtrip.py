"""HF -> Megatron -> HF round trips for Llama, Qwen2 and Qwen3, run in this process (a world of one).

Each converter proves logit parity itself (``verify=True``); these tests also compare every
tensor bit for bit, check the stored layout against independent reconstructions, and feed the
converters bad input.
"""

import json
import math
import shutil

import pytest
import torch
from megatron.core import dist_checkpointing

from megatron_rift.checkpointing import TRACKER_FILE
from megatron_rift.convert import ConversionError, convert_hf_to_megatron, convert_megatron_to_hf
from megatron_rift.model import GPTArchitecture
from megatron_rift.parallel import destroy_distributed
from tests.workers.convert_tiny_models import (
    FAMILIES,
    VOCAB,
    make_tiny_hf_model,
    safetensors_weights,
)

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _world_of_one():
    yield
    destroy_distributed()  # the converters initialized it; leave the process as we found it


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {
        "llama": make_tiny_hf_model(root / "llama", "llama"),
        "qwen2": make_tiny_hf_model(root / "qwen2", "qwen2", tokenizer=True),
        "qwen3": make_tiny_hf_model(
            root / "qwen3", "qwen3", max_shard_size="100KB"
        ),  # sharded + index
    }


@pytest.fixture(scope="module")
def converted(hf_models, tmp_path_factory):
    """family -> Megatron checkpoint root (fp32, TP=1), converted with verify."""
    root = tmp_path_factory.mktemp("megatron")
    out = {}
    for family, hf_dir in hf_models.items():
        result = convert_hf_to_megatron(hf_dir, root / family, target_dtype="fp32", verify=True)
        assert result.max_abs_logit_diff is not None and result.max_abs_logit_diff <= 1e-4
        out[family] = root / family
    return out


def assert_same_weights(expected: dict, actual: dict):
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_round_trip_is_bit_identical_and_verified(family, hf_models, converted, tmp_path, capsys):
    result = convert_megatron_to_hf(converted[family], tmp_path / "hf", verify=True)
    assert result.max_abs_logit_diff <= 1e-4
    assert "max_abs_logit_diff=" in capsys.readouterr().out
    assert_same_weights(
        safetensors_weights(hf_models[family]), safetensors_weights(tmp_path / "hf")
    )
    source = json.loads((hf_models[family] / "config.json").read_text())
    exported = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in (
        "model_type",
        "architectures",
        "vocab_size",
        "num_key_value_heads",
        "tie_word_embeddings",
        "rope_parameters",
        "eos_token_id",
    ):
        assert exported[key] == source[key], key
    assert (tmp_path / "hf" / "generation_config.json").is_file()
    if family == "qwen2":  # the one built with a tokenizer
        from transformers import AutoTokenizer

        text = "solve for x: 3x = 12"
        original = AutoTokenizer.from_pretrained(str(hf_models[family])).encode(text)
        assert (
            original
            and AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode(text) == original
        )


def test_layout_of_the_megatron_checkpoint(hf_models, converted):
    """Stored tensors against layouts rebuilt here by hand: padded vocab, per-group QKV, [gate; up]."""
    hf = safetensors_weights(hf_models["qwen2"])
    stored = dist_checkpointing.load_plain_tensors(str(converted["qwen2"] / "release"))
    root = converted["qwen2"]
    assert (root / TRACKER_FILE).read_text().strip() == "release"
    arch = GPTArchitecture.load(root)
    assert (arch.vocab_size, arch.num_query_groups, arch.add_qkv_bias, arch.rotary_base) == (
        VOCAB,
        2,
        True,
        1e6,
    )

    embedding = stored["embedding.word_embeddings.weight"]
    assert embedding.shape[0] == math.ceil(VOCAB / 128) * 128  # Megatron's padding at TP=1
    assert torch.equal(embedding[:VOCAB], hf["model.embed_tokens.weight"])
    assert not embedding[VOCAB:].any()  # padded rows are zero

    heads, groups, head_dim = 4, 2, 16
    for suffix in ("weight", "bias"):
        q, k, v = (hf[f"model.layers.1.self_attn.{p}_proj.{suffix}"] for p in "qkv")
        rows = []
        for g in range(groups):
            for h in range(g * heads // groups, (g + 1) * heads // groups):
                rows.append(q[h * head_dim : (h + 1) * head_dim])
            rows += [k[g * head_dim : (g + 1) * head_dim], v[g * head_dim : (g + 1) * head_dim]]
        assert torch.equal(
            stored[f"decoder.layers.self_attention.linear_qkv.{suffix}"][1], torch.cat(rows)
        )
    fc1 = stored["decoder.layers.mlp.linear_fc1.weight"][0]
    assert torch.equal(
        fc1,
        torch.cat(
            [hf["model.layers.0.mlp.gate_proj.weight"], hf["model.layers.0.mlp.up_proj.weight"]]
        ),
    )
    assert torch.equal(
        stored["decoder.layers.self_attention.linear_qkv.layer_norm_weight"][0],
        hf["model.layers.0.input_layernorm.weight"],
    )
    assert "output_layer.weight" not in stored  # tied
    assert sorted(p.name for p in (root / "tokenizer").iterdir()) == [
        "chat_template.jinja",
        "tokenizer.json",
        "tokenizer_config.json",
    ]


def test_bf16_round_trip_keeps_dtype_and_bits(tmp_path):
    hf_dir = make_tiny_hf_model(tmp_path / "hf", "qwen3", dtype=torch.bfloat16)
    result = convert_hf_to_megatron(
        hf_dir, tmp_path / "meg", verify=True
    )  # default: bf16 from config.json
    # Stored in bf16, verified in fp32 from the same bf16 weights: lossless, so the fp32 bound holds.
    assert result.dtype == torch.bfloat16 and result.max_abs_logit_diff <= 1e-4
    stored = dist_checkpointing.load_tensors_metadata(str(tmp_path / "meg" / "release"))
    assert stored["decoder.layers.self_attention.linear_qkv.weight"].dtype == torch.bfloat16
    back = convert_megatron_to_hf(
        tmp_path / "meg", tmp_path / "back", verify=True, verify_dtype="bf16"
    )
    assert back.parity.dtype == torch.bfloat16
    assert 0 < back.max_abs_logit_diff <= 0.05 * back.parity.max_abs_logit
    assert_same_weights(safetensors_weights(hf_dir), safetensors_weights(tmp_path / "back"))


def test_fp32_source_to_bf16_rounds_like_torch(hf_models, tmp_path):
    result = convert_hf_to_megatron(
        hf_models["llama"], tmp_path / "meg", target_dtype="bf16", verify=True
    )
    assert result.max_abs_logit_diff <= 1e-4  # both sides see the same bf16-rounded weights
    convert_megatron_to_hf(tmp_path / "meg", tmp_path / "back")
    expected = {k: v.to(torch.bfloat16) for k, v in safetensors_weights(hf_models["llama"]).items()}
    assert_same_weights(expected, safetensors_weights(tmp_path / "back"))


def test_export_of_a_training_checkpoint(hf_models, converted, tmp_path):
    """A trainer's root: tracker -> iter_0000007 holding the model plus optimizer-like entries."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_rift.checkpointing import (
        load_model_weights,
        model_sharded_state_dict,
        save_checkpoint,
    )
    from megatron_rift.model import build_gpt_model, to_transformer_config

    arch = GPTArchitecture.load(converted["llama"])
    model = build_gpt_model(arch, to_transformer_config(arch, loads_weights=True))
    load_model_weights(converted["llama"], model)
    state = model_sharded_state_dict(model)
    state["optimizer"] = {
        "exp_avg": ShardedTensor.from_rank_offsets("optimizer.state.exp_avg.x", torch.ones(7))
    }
    state["iteration"] = 7
    root = tmp_path / "run"
    save_checkpoint(root, 7, state)
    arch.save(root)
    shutil.copytree(
        converted["qwen2"] / "tokenizer", root / "tokenizer"
    )  # but no hf_config/ folder
    convert_megatron_to_hf(root, tmp_path / "hf")
    assert_same_weights(
        safetensors_weights(hf_models["llama"]), safetensors_weights(tmp_path / "hf")
    )
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    eos = AutoTokenizer.from_pretrained(str(root / "tokenizer")).eos_token_id
    assert eos is not None and AutoConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == eos
    assert GenerationConfig.from_pretrained(str(tmp_path / "hf")).eos_token_id == eos
    # An iteration folder works as the path too.
    convert_megatron_to_hf(root / "iter_0000007", tmp_path / "hf2")


EXPORT_IN_A_FRESH_PROCESS = """
import sys
from megatron.core import parallel_state
import torch.distributed as dist
from megatron_rift.convert import convert_megatron_to_hf
from megatron_rift.cpu_compat import cpu_compat_active
for out in sys.argv[2:]:  # twice: the second call reuses the process group
    convert_megatron_to_hf(sys.argv[1], out, show_progress=False)
print(dist.get_world_size(), dist.get_backend(), parallel_state.model_parallel_is_initialized(),
      cpu_compat_active())
"""


def test_export_without_verify_sets_up_only_a_process_group(hf_models, converted, tmp_path):
    """The demo exports every model inside its own process, between generation runs: without
    verify the export leaves that process a gloo world of one, with no Megatron parallel state
    and no CUDA->CPU remap (which would sit under every later torch call)."""
    import subprocess
    import sys

    from tests.torchrun_utils import REPO

    outs = [tmp_path / "first", tmp_path / "second"]
    proc = subprocess.run(
        [sys.executable, "-c", EXPORT_IN_A_FRESH_PROCESS, str(converted["qwen2"]), *map(str, outs)],
        capture_output=True,
        text=True,
        cwd=str(REPO),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["1", "gloo", "False", "False"]
    for out in outs:
        assert_same_weights(safetensors_weights(hf_models["qwen2"]), safetensors_weights(out))


def test_in_memory_state_dict_export_uses_the_spec_names(hf_models, converted):
    from megatron_rift.checkpointing import load_model_weights
    from megatron_rift.convert.megatron_to_hf import hf_weights_from_state_dict
    from megatron_rift.model import build_gpt_model, get_layer_spec, to_transformer_config

    arch = GPTArchitecture.load(converted["qwen3"])
    model = build_gpt_model(arch, to_transformer_config(arch, loads_weights=True), use_te=False)
    load_model_weights(converted["qwen3"], model)
    spec = get_layer_spec(use_te=False, qk_layernorm=True)
    weights = hf_weights_from_state_dict(model.state_dict(), arch, spec)
    assert_same_weights(
        safetensors_weights(hf_models["qwen3"]), {k: v.contiguous() for k, v in weights.items()}
    )


def test_existing_output_is_refused_then_replaced(hf_models, converted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_hf_to_megatron(hf_models["qwen2"], out)
    assert (out / "keep.txt").exists()
    convert_hf_to_megatron(hf_models["qwen2"], out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "release").is_dir()
    with pytest.raises(ConversionError, match="--overwrite"):
        convert_megatron_to_hf(converted["qwen2"], out)


def test_failed_verify_leaves_nothing(hf_models, tmp_path):
    with pytest.raises(ConversionError, match="max_abs_logit_diff"):
        convert_hf_to_megatron(
            hf_models["llama"], tmp_path / "out", verify=True, verify_tolerance=-1.0
        )
    assert list(tmp_path.iterdir()) == []


def _rewrite_weights(src, dst, edit):
    from safetensors.torch import save_file

    shutil.copytree(src, dst)
    weights = safetensors_weights(dst)
    for path in dst.glob("model*.safetensors*"):
        path.unlink()
    edit(weights)
    save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_missing_and_unexpected_weights_are_named(hf_models, tmp_path):
    def edit(w):
        del w["model.layers.1.mlp.up_proj.weight"]
        w["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)

    bad = _rewrite_weights(hf_models["qwen2"], tmp_path / "bad", edit)
    with pytest.raises(ConversionError) as err:
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert "model.layers.1.mlp.up_proj.weight" in str(err.value)
    assert "model.layers.0.self_attn.o_proj.bias" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_wrong_shape_fails_midway_and_leaves_nothing(hf_models, tmp_path):
    def edit(w):
        w["model.layers.1.mlp.down_proj.weight"] = torch.zeros(64, 95)

    bad = _rewrite_weights(hf_models["llama"], tmp_path / "bad", edit)
    with pytest.raises(ConversionError, match="down_proj"):
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("model_type", "gpt2", "supported model types: llama, mixtral, qwen2, qwen3, qwen3_moe"),
        ("use_sliding_window", True, "use_sliding_window"),
        (
            "rope_parameters",
            {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4},
            "rope_parameters.rope_type",
        ),
        (
            "rope_parameters",
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 4096,
                "rope_theta": 5e5,
            },
            "rope_parameters.original_max_position_embeddings",
        ),
        ("hidden_act", "gelu", "hidden_act"),
    ],
)
def test_unsupported_configs_name_the_field(hf_models, tmp_path, field, value, message):
    bad = tmp_path / "bad"
    shutil.copytree(hf_models["qwen2"], bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg[field] = value
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=message.replace(".", r"\.")) as err:
        convert_hf_to_megatron(bad, tmp_path / "out")
    assert str(bad / "config.json") in str(err.value)
    assert not (tmp_path / "out").exists()


def test_legacy_rope_fields_are_read(hf_models):
    """transformers-4 config.json files (Qwen2.5 on the Hub) spell RoPE as rope_theta / rope_scaling."""
    from megatron_rift.convert.hf_config import architecture_from_hf_config

    cfg = json.loads((hf_models["llama"] / "config.json").read_text())
    params = cfg.pop("rope_parameters")
    cfg["rope_theta"] = params.pop("rope_theta")
    cfg["rope_scaling"] = params
    arch = architecture_from_hf_config(cfg)
    assert (arch.rotary_base, arch.rope_scaling, arch.rope_scaling_factor) == (500000.0, True, 32.0)


@pytest.mark.parametrize("corruption", ["k_bias_reversed", "q_heads_swapped", "gate_up_swapped"])
def test_verify_catches_a_wrong_mapping(hf_models, converted, tmp_path, corruption):
    """Negative control: the HF side with one plausible mapping mistake must fail the fp32 bound."""
    from megatron_rift.convert.verify import verify_parity

    def edit(w):
        layer = "model.layers.1."
        if corruption == "k_bias_reversed":
            w[layer + "self_attn.k_proj.bias"] = (
                w[layer + "self_attn.k_proj.bias"].flip(0).contiguous()
            )
        elif (
            corruption == "q_heads_swapped"
        ):  # heads 0 and 1 share a query group: a GQA-grouping slip
            q = w[layer + "self_attn.q_proj.weight"]
            w[layer + "self_attn.q_proj.weight"] = torch.cat(
                [q[16:32], q[:16], q[32:]]
            ).contiguous()
        else:
            gate, up = w[layer + "mlp.gate_proj.weight"], w[layer + "mlp.up_proj.weight"]
            w[layer + "mlp.gate_proj.weight"], w[layer + "mlp.up_proj.weight"] = up, gate

    bad = _rewrite_weights(hf_models["qwen2"], tmp_path / "bad", edit)
    arch = GPTArchitecture.load(converted["qwen2"])
    assert verify_parity(converted["qwen2"], hf_models["qwen2"], arch).max_abs_logit_diff <= 1e-4
    parity = verify_parity(converted["qwen2"], bad, arch)
    print(f"{corruption}: max_abs_logit_diff={parity.max_abs_logit_diff:.3g}")
    assert parity.max_abs_logit_diff > 1e-3
