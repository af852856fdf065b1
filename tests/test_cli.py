import subprocess
import sys

import pytest

from kvcompress.cli import main


def test_strategies_table(capsys):
    main(["strategies"])
    out = capsys.readouterr().out
    assert "model default: 30 layers, KV stored as bfloat16 (as its config declares)" in out
    rows = {line.split()[0]: line.split() for line in out.splitlines()[3:]}
    assert list(rows) == ["full", "int8", "fp8", "int4", "window", "sink"]
    assert rows["full"][4] == "23,040" and rows["full"][-1] == "0.0%"
    assert rows["int8"][4] == "11,880" and rows["int8"][-1] == "48.4%"  # the report's bfloat16 figure
    main(["strategies", "--kv-dtype", "float32"])
    rows = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[3:]}
    assert rows["full"][4] == "46,080" and rows["int8"][-1] == "74.2%"


def test_strategies_for_a_shipped_architecture(capsys):
    main(["strategies", "--model", "random:llama-3.1-8b", "--context", "32k", "--strategies", "full,int8"])
    out = capsys.readouterr().out
    assert "4,096.00" in out and "131,072" in out and "49.2%" in out


def test_bad_input_exits_with_the_reason(capsys):
    with pytest.raises(SystemExit, match="unknown strategy part 'int9'.*Did you mean 'int8'"):
        main(["strategies", "--strategies", "full,int9"])
    with pytest.raises(SystemExit, match="unknown architecture 'nope'"):
        main(["strategies", "--model", "random:nope"])


def test_generate_prints_text_and_kv_bytes(default_model):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "kvcompress.cli",
            "generate",
            "--strategy",
            "sink:sinks=4,window=16+int8",
            "--max-new-tokens",
            "24",
            "What is the capital of France?",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "[kv] sink:window=16+int8: device" in result.stderr and "resident for 20 of" in result.stderr
    assert "saved" in result.stderr
