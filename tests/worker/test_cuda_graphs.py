"""Which captured graph a decode step replays, and how its inputs are padded to that size."""

from worker.cuda_graphs import capture_sizes, pad_decodes, padded_size


def test_sizes_cover_every_batch_up_to_max_num_seqs() -> None:
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert capture_sizes(12) == [1, 2, 4, 8, 12]
    assert capture_sizes(3) == [1, 2, 3]
    assert capture_sizes(1) == [1]
    for max_num_seqs in range(1, 100):
        sizes = capture_sizes(max_num_seqs)
        assert sizes == sorted(set(sizes)) and sizes[-1] == max_num_seqs
        assert all(padded_size(sizes, rows) is not None for rows in range(1, max_num_seqs + 1))


def test_a_step_replays_the_smallest_size_that_holds_it() -> None:
    sizes = capture_sizes(64)
    assert [padded_size(sizes, rows) for rows in (1, 2, 3, 5, 8, 9, 17, 63, 64)] == [
        1,
        2,
        4,
        8,
        8,
        16,
        24,
        64,
        64,
    ]
    assert padded_size(sizes, 65) is None


def test_padding_rows_store_nowhere_and_see_no_keys() -> None:
    padded = pad_decodes(4, [11, 12], [7, 30], [5, 9], [103, 480])
    assert padded.input_ids == [11, 12, 0, 0]
    assert padded.positions == [7, 30, 0, 0]
    assert padded.prompt_lens == [5, 9, 0, 0]
    assert padded.slot_mapping == [103, 480, -1, -1]
    assert padded.seq_lens == [8, 31, 0, 0]  # a decode at position p sees p + 1 keys
    assert pad_decodes(2, [11, 12], [7, 30], [5, 9], [103, 480]).slot_mapping == [103, 480]
