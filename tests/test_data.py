"""The sampler: per-rank slices of each global batch, every sample once per epoch, resumable."""

from workers.data import GlobalBatchSampler, IGNORE_INDEX, Sample, collate


def test_slices_partition_each_global_batch_and_cover_the_epoch():
    sampler = GlobalBatchSampler(num_samples=100, micro_batches=(3, 1, 2), grad_accum=2, seed=7)
    assert sampler.global_batch == 12 and sampler.steps_per_epoch == 8
    seen = []
    for step in range(sampler.steps_per_epoch):
        per_rank = [sampler.rank_micro_batches(step, r) for r in range(3)]
        assert [[len(m) for m in rank] for rank in per_rank] == [[3, 3], [1, 1], [2, 2]]
        flat = [i for rank in per_rank for micro in rank for i in micro]
        assert flat == sampler.global_indices(step)
        seen += flat
    assert len(seen) == len(set(seen)) == 96  # no sample twice; 4 left over wait for the next shuffle


def test_every_step_is_a_pure_function_of_its_number():
    a = GlobalBatchSampler(50, (2, 2), 1, seed=1)
    b = GlobalBatchSampler(50, (2, 2), 1, seed=1)
    assert a.rank_micro_batches(37, 1) == b.rank_micro_batches(37, 1)  # a resumed job takes the same batch
    assert a.global_indices(0) != a.global_indices(a.steps_per_epoch)  # a new epoch reshuffles


def test_collate_pads_and_masks_loss():
    batch = collate([Sample([5, 6, 7], [IGNORE_INDEX, 6, 7]), Sample([8], [8])], pad_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch.attention_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch.loss_tokens == 2  # shifted labels: row 0 predicts 6 and 7; row 1 has nothing to predict
