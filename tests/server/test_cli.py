"""The command line: every flag documented, bad values rejected with the field named."""
import subprocess
import sys

import pytest

from server.cli import build_parser, engine_config

FLAGS = ["--model", "--host", "--port", "--served-model-name", "--dtype", "--device", "--max-model-len",
         "--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--num-kv-blocks", "--kv-cache-memory",
         "--gpu-memory-utilization", "--load-format", "--seed", "--log-level", "--api-key", "--max-queue-len",
         "--max-request-body", "--shutdown-timeout", "--enable-prefix-caching", "--no-enable-prefix-caching",
         "--max-prefill-tokens-while-decoding", "--linear-backend", "--attention-backend", "--enforce-eager",
         "--chat-template", "--tool-call-parser", "--responses-store-size"]


def test_help_documents_every_flag():
    out = subprocess.run([sys.executable, "-m", "server", "serve", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for flag in FLAGS:
        assert flag in out


def test_flags_become_engine_config():
    args = build_parser().parse_args(["serve", "--max-num-seqs", "8", "--kv-cache-memory", "2GiB",
                                      "--block-size", "32", "--dtype", "float32"])
    cfg = engine_config(args)
    assert (cfg.max_num_seqs, cfg.kv_cache_memory, cfg.block_size, cfg.dtype) == (8, 2 << 30, 32, "float32")
    assert cfg.enable_prefix_caching  # on by default
    assert cfg.max_prefill_tokens_while_decoding == 0
    capped = build_parser().parse_args(["serve", "--max-prefill-tokens-while-decoding", "256"])
    assert engine_config(capped).max_prefill_tokens_while_decoding == 256
    assert not engine_config(build_parser().parse_args(["serve", "--no-enable-prefix-caching"])).enable_prefix_caching
    kernels = engine_config(build_parser().parse_args(["serve", "--linear-backend", "onednn",
                                                       "--attention-backend", "torch"]))
    assert (kernels.linear_backend, kernels.attention_backend) == ("onednn", "torch")
    assert (cfg.linear_backend, cfg.attention_backend) == ("auto", "auto")


def test_invalid_value_names_the_field():
    args = build_parser().parse_args(["serve", "--max-num-seqs", "0"])
    with pytest.raises(ValueError, match="max_num_seqs"):
        engine_config(args)


def test_every_engine_option_is_a_flag_with_its_default():
    """The flags are generated from EngineConfig: none is missing, and no flag given means the defaults."""
    from dataclasses import fields

    from engine import EngineConfig

    parser = build_parser()
    assert engine_config(parser.parse_args(["serve"])) == EngineConfig()
    options = parser._subparsers._group_actions[0].choices["serve"]._option_string_actions
    assert all("--" + f.name.replace("_", "-") in options for f in fields(EngineConfig))
    args = parser.parse_args(["serve", "--tokenizer", "some/dir", "--enforce-eager", "--kv-cache-memory", "512MB"])
    cfg = engine_config(args)
    assert (cfg.tokenizer, cfg.enforce_eager, cfg.kv_cache_memory) == ("some/dir", True, 512_000_000)


@pytest.mark.parametrize("value,problem", [
    ("no/such/template.jinja", "neither a file, a shipped template"),
    ("{% if %}", "not a valid Jinja template"),
])
def test_a_bad_chat_template_stops_the_start_naming_it(value, problem):
    run = subprocess.run([sys.executable, "-m", "server", "serve", "--chat-template", value], capture_output=True,
                         text=True, timeout=120, check=False)
    assert run.returncode == 2 and "chat_template" in run.stderr and problem in run.stderr


def test_chat_template_is_a_file_a_shipped_name_or_the_template_itself(tmp_path, monkeypatch):
    from server import templates

    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    path = tmp_path / "t.jinja"
    path.write_text(inline)
    assert templates.resolve(str(path)) == inline
    assert templates.resolve(inline) == inline
    monkeypatch.chdir(tmp_path)  # a shipped template is found by name from any directory
    with open(f"{templates.SHIPPED_DIR}/smollm2_tool_use.jinja") as f:
        shipped = f.read()
    assert templates.resolve("smollm2_tool_use") == templates.resolve("smollm2_tool_use.jinja") == shipped


@pytest.mark.parametrize("value", ["-1", str((1 << 20) + 1)])
def test_a_responses_store_size_out_of_bounds_is_refused(value):
    from server.cli import _check_server_flags

    args = build_parser().parse_args(["serve", "--responses-store-size", value])
    with pytest.raises(ValueError, match="responses_store_size"):
        _check_server_flags(args)
    _check_server_flags(build_parser().parse_args(["serve", "--responses-store-size", "0"]))


def test_the_model_is_positional_as_vllms():
    assert engine_config(build_parser().parse_args(["serve", "some/dir"])).model == "some/dir"
    same = build_parser().parse_args(["serve", "some/dir", "--model", "some/dir"])
    assert engine_config(same).model == "some/dir"
    with pytest.raises(ValueError, match="model: given twice"):
        engine_config(build_parser().parse_args(["serve", "a", "--model", "b"]))


def test_version_and_vllms_flags_are_known():
    run = subprocess.run([sys.executable, "-m", "server", "--version"], capture_output=True, text=True, timeout=120,
                         check=True)
    assert run.stdout.startswith("kvserve ")
    args = build_parser().parse_args(["serve", "--enable-auto-tool-choice", "--trust-request-chat-template",
                                      "--allowed-origins", '["http://a.example"]', "--allow-credentials",
                                      "--scheduling-policy", "priority"])
    assert args.enable_auto_tool_choice and args.trust_request_chat_template and args.allow_credentials
    assert args.allowed_origins == ["http://a.example"] and engine_config(args).scheduling_policy == "priority"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--allowed-origins", "http://a.example"])  # not a JSON list


def test_auto_tool_choice_without_a_known_format_stops_the_start(smollm2_dir, smollm2_tokenizer, tmp_path):
    own = tmp_path / "own.jinja"
    own.write_text(smollm2_tokenizer.chat_template)  # SmolLM2's own: shows no tools
    run = subprocess.run([sys.executable, "-m", "server", "serve", str(smollm2_dir), "--chat-template", str(own),
                          "--enable-auto-tool-choice", "--port", "0"], capture_output=True, text=True, timeout=300,
                         check=False)
    assert run.returncode == 2 and "enable_auto_tool_choice" in run.stderr
