"""The catalog resolves NVML names from old and new drivers and keeps unconfirmed cells marked."""

from orchestrator import catalog


def test_old_and_new_driver_names_resolve_to_one_entry():
    for old, new in [("GeForce GTX 1080 Ti", "NVIDIA GeForce GTX 1080 Ti"), ("GeForce RTX 2080 Ti", "NVIDIA GeForce RTX 2080 Ti")]:
        assert catalog.lookup(old) is catalog.lookup(new) is not None
    assert catalog.lookup("Tesla V100-PCIE-32GB").name == "Tesla V100 PCIe 32GB"
    assert catalog.lookup("RTX 3090") is catalog.lookup("NVIDIA GeForce RTX 3090")  # what users type


def test_same_name_variants_by_memory():
    assert catalog.lookup("NVIDIA GeForce RTX 3080", memory_mib=10240).name == "GeForce RTX 3080 10GB"
    assert catalog.lookup("NVIDIA GeForce RTX 3080", memory_mib=12288).name == "GeForce RTX 3080 12GB"
    assert catalog.lookup("NVIDIA GeForce RTX 3080") is None  # ambiguous without memory


def test_training_rates_follow_the_hardware():
    pascal, ampere = catalog.lookup("NVIDIA GeForce GTX 1080 Ti"), catalog.lookup("NVIDIA GeForce RTX 3090")
    assert pascal.matmul_tflops("fp16") == pascal.fp32_tflops  # no tensor cores: fp16 is no faster
    assert ampere.matmul_tflops("bf16") == 71.2  # GeForce: FP32-accumulate tensor rate, half the FP16-accumulate one
    assert "fp16_tc_dense_fp32acc_tflops" in catalog.lookup("NVIDIA GeForce RTX 5090").unconfirmed


def test_every_row_is_consistent():
    for spec in catalog.all_specs():
        assert spec.bf16 == (spec.compute_capability >= (8, 0)), spec.name
        assert spec.mem_bandwidth_gbs > 0 and spec.fp32_tflops > 0 and spec.vram_gib > 0, spec.name
