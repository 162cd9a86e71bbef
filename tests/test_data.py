"""The sampler: per-rank slices of each global batch, every sample once per epoch, resumable."""

from workers.data import GlobalBatchSampler, IGNORE_INDEX, Sample, collate


def test_slices_partition_each_global_batch():
    sampler = GlobalBatchSampler(num_samples=100, micro_batches=(3, 1, 2), grad_accum=2, seed=7)
    assert sampler.global_batch == 12
    for step in range(20):
        per_rank = [sampler.rank_micro_batches(step, r) for r in range(3)]
        assert [[len(m) for m in rank] for rank in per_rank] == [[3, 3], [1, 1], [2, 2]]
        assert [i for rank in per_rank for micro in rank for i in micro] == sampler.global_indices(step)


def test_every_sample_exactly_once_per_epoch_even_when_batches_straddle_epochs():
    sampler = GlobalBatchSampler(num_samples=100, micro_batches=(3, 1, 2), grad_accum=2, seed=7)
    stream = [i for step in range(50) for i in sampler.global_indices(step)]  # 600 samples = 6 epochs
    for epoch in range(6):
        assert sorted(stream[epoch * 100 : (epoch + 1) * 100]) == list(range(100))
    assert stream[:100] != stream[100:200]  # each epoch is reshuffled


def test_every_step_is_a_pure_function_of_its_number():
    a = GlobalBatchSampler(50, (2, 2), 1, seed=1)
    b = GlobalBatchSampler(50, (2, 2), 1, seed=1)
    assert a.rank_micro_batches(37, 1) == b.rank_micro_batches(37, 1)  # a resumed job takes the same batch


def test_collate_pads_and_masks_loss():
    batch = collate([Sample([5, 6, 7], [IGNORE_INDEX, 6, 7]), Sample([8], [8])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.loss_tokens == 2  # shifted labels: row 0 predicts 6 and 7; row 1 has nothing to predict
