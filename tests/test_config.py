import pytest

from infinity import AioConfig, ConfigError, format_size, parse_size
from infinity.io._deepspeed import normalize_arch_list


@pytest.mark.parametrize(
    "text,expected",
    [
        (4096, 4096),
        ("4096", 4096),
        ("8MiB", 8 * 2**20),
        ("8 mib", 8 * 2**20),
        ("1.5GB", 1_500_000_000),
        ("4GiB", 4 * 2**30),
        ("3e8", 300_000_000),
        ("64KiB", 65536),
        ("1TiB", 2**40),
        ("0", 0),
    ],
)
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "8 parsecs", "-1", "1.5", "GiB", True, "1e-3"])
def test_parse_size_rejects(bad):
    with pytest.raises(ConfigError):
        parse_size(bad)


def test_format_size():
    assert format_size(3 * 2**30) == "3.00 GiB"
    assert format_size(100) == "100 B"


def test_aio_config_validates():
    with pytest.raises(ConfigError, match="multiple of 4096"):
        AioConfig(block_size_bytes=1000)
    with pytest.raises(ConfigError, match="queue_depth must be a positive integer"):
        AioConfig(queue_depth=0)
    with pytest.raises(ConfigError, match="intra_op_parallelism"):
        AioConfig(intra_op_parallelism=-2)
    with pytest.raises(ConfigError, match="smaller than one aligned unit"):
        AioConfig(bounce_buffer_bytes=4096, intra_op_parallelism=8)


def test_aio_config_bounds():
    """Each lane pins two bounce buffers and starts its handles' threads: a million lanes
    would ask DeepSpeed for terabytes of pinned memory and abort the process."""
    with pytest.raises(ConfigError, match="lanes=1000000 exceeds 256"):
        AioConfig(lanes=10**6)
    with pytest.raises(ConfigError, match="intra_op_parallelism=257 exceeds 256"):
        AioConfig(intra_op_parallelism=257)
    assert AioConfig(lanes=256, intra_op_parallelism=256).lanes == 256


def test_aio_config_sizes_and_round_trip():
    cfg = AioConfig(block_size_bytes="1MiB", bounce_buffer_bytes="10MiB", intra_op_parallelism=3)
    assert cfg.block_size_bytes == 2**20
    assert cfg.bounce_chunk_bytes % (4096 * 3) == 0 and cfg.bounce_chunk_bytes <= 10 * 2**20
    assert AioConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown AioConfig keys.*thread_count"):
        AioConfig.from_dict({"thread_count": 8})
    section = cfg.deepspeed_section()
    assert section["intra_op_parallelism"] == 3 and "thread_count" not in section


def test_environment_overrides(monkeypatch):
    monkeypatch.setenv("INFINITY_AIO_QUEUE_DEPTH", "64")
    monkeypatch.setenv("INFINITY_AIO_BLOCK_SIZE", "2MiB")
    monkeypatch.setenv("INFINITY_AIO_SINGLE_SUBMIT", "1")
    cfg = AioConfig()
    assert (cfg.queue_depth, cfg.block_size_bytes, cfg.single_submit) == (64, 2 * 2**20, True)
    assert AioConfig(queue_depth=8).queue_depth == 8  # explicit beats the environment
    monkeypatch.setenv("INFINITY_AIO_LANES", "many")
    with pytest.raises(ConfigError, match="INFINITY_AIO_LANES='many'"):
        AioConfig()


@pytest.mark.parametrize(
    "given,fixed",
    [
        ("9.0a", "9.0"),
        ("8.0;9.0a", "8.0;9.0"),
        ("9.0a+PTX", "9.0+PTX"),
        ("10.0f 9.0", "10.0;9.0"),
        ("8.6", "8.6"),
    ],
)
def test_arch_list_normalised(given, fixed):
    assert normalize_arch_list(given) == fixed
