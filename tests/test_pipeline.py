"""The streaming input pipeline (dn2_jax.pipeline) and the lazy sources it reads (dn2_jax.data)."""

import threading
import time

import jax
import numpy as np
import psutil
import pytest
from PIL import Image

from dn2_jax import data, pipeline, store
from dn2_jax.detector import Detector
from dn2_jax.errors import DN2Error, DN2FileError
from dn2_jax.evaluation.features import FeatureExtractor

META = {"backbone": "mean", "fingerprint": "f", "preset": "p", "dataset": "d", "split": "s"}


@pytest.fixture(autouse=True)
def _fresh():
    data.clear_cache()


def _folder(root, sizes=((6, 5), (4, 7)), per_class=5, gray_every=0):
    """root/<c0,c1>/<i>.png: image i of class c has size sizes[i % len(sizes)] and pixel values from (c, i)."""
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(per_class):
            h, w = sizes[i % len(sizes)]
            rgb = np.add.outer(np.arange(h), np.arange(w))[..., None] + np.array([c * 50, i * 7, 3])
            img = rgb.astype(np.uint8)
            img = img[..., 0] if gray_every and i % gray_every == 0 else img
            Image.fromarray(img).save(root / f"c{c}" / f"{i}.png")
    return root


def _eager(paths):
    """What the in-memory loader gave: every file decoded, grayscale promoted when the set mixes colour."""
    images = [data.decode_image(p) for p in paths]
    if any(im.ndim == 3 for im in images):
        images = [np.repeat(im[..., None], 3, -1) if im.ndim == 2 else im for im in images]
    return images


def _mean_embed(batch):
    """A deterministic (B, 2) feature: mean pixel and the image height."""
    b = np.asarray(batch, np.float32)
    return np.stack([b.reshape(len(b), -1).mean(1), np.full(len(b), b.shape[1], np.float32)], 1)


def test_folder_source_decodes_nothing_up_front(tmp_path, monkeypatch):
    root = _folder(tmp_path / "f")
    calls = []
    real = data.decode_image
    monkeypatch.setattr(data, "decode_image", lambda path, **kw: calls.append(path) or real(path, **kw))
    ds = data.load_dataset(f"folder:{root}", "all")
    assert isinstance(ds.images, data.FolderImages) and len(ds) == 10 and calls == []
    assert ds.images.shapes()[:2] == [(6, 5, 3), (4, 7, 3)] and not ds.images.uniform
    sub = data.take(ds.images, [3, 1])
    assert calls == [] and len(sub) == 2
    np.testing.assert_array_equal(sub[0], real(ds.paths[3]))
    assert calls == [ds.paths[3]]


def test_packed_paths_are_a_sequence_of_the_same_strings(monkeypatch):
    monkeypatch.setattr(data.PackedPaths, "CHUNK", 4)  # several chunks, the last one partial
    names = [f"/d/{'x' * (i % 5)}{i}.png" for i in range(11)] + ["/d/caf\u00e9.png", "/d/bad\udcff.png"]
    packed = data.PackedPaths(names[:6])
    packed.extend(names[6:9])  # refills the partial last chunk
    packed.extend(iter(names[9:]))
    assert len(packed) == len(names) and list(packed) == names and packed == names and packed == tuple(names)
    assert [packed[i] for i in range(-len(names), len(names))] == names + names
    assert packed[2:9:3] == names[2:9:3] and packed[np.array([12, 0])] == [names[12], names[0]]
    assert packed != names[:-1] and packed != names[:-1] + ["/d/other.png"]
    assert packed.take([12, 3, -1, 0]) == [names[12], names[3], names[-1], names[0]] and packed.take([]) == []
    with pytest.raises(IndexError):
        packed[len(names)]
    assert len(data.PackedPaths()) == 0 and list(data.PackedPaths()) == []


def test_folder_subset_keeps_paths_and_shapes(tmp_path):
    root = _folder(tmp_path / "f", gray_every=2)
    ds = data.load_dataset(f"folder:{root}", "all")
    assert isinstance(ds.paths, data.PackedPaths) and ds.images.paths is ds.paths
    sub = ds.images.subset([9, 3, 1])
    assert sub.paths == [ds.paths[9], ds.paths[3], ds.paths[1]]
    assert sub.shapes() == [ds.images.shapes()[i] for i in (9, 3, 1)] and not sub.uniform
    one = ds.images.subset([1, 3])  # both (4, 7): one shape, so one array
    assert one.uniform and one.shape == (2, 4, 7, 3) and np.asarray(one).shape == (2, 4, 7, 3)
    assert pipeline.order_by_shape(one, np.array([1, 0])).tolist() == [1, 0]


def test_batches_equal_the_eager_path_bit_for_bit(tmp_path):
    root = _folder(tmp_path / "f", sizes=((6, 5), (4, 7), (6, 5)), per_class=7, gray_every=4)
    ds = data.load_dataset(f"folder:{root}", "all")
    eager = _eager(ds.paths)
    order = pipeline.order_by_shape(ds.images, np.arange(len(ds))[::-1])
    assert [eager[i].shape for i in order] == sorted((eager[i].shape for i in order), key=[
        eager[i].shape for i in order].index)  # grouped by shape
    seen = []
    for positions, batch in pipeline.batches(ds.images, order, 4, chunk_size=6, threads=3, prefetch=2):
        assert batch.dtype == np.uint8 and len(batch) <= 4 and len({int(p) // 6 for p in positions}) == 1
        np.testing.assert_array_equal(batch, np.stack([eager[order[p]] for p in positions]))
        seen += positions.tolist()
    assert seen == list(range(len(ds)))
    # An in-memory array streams the same rows as numpy indexing.
    arr = np.random.default_rng(0).integers(0, 256, (23, 3, 4), dtype=np.uint8)
    idx = np.random.default_rng(1).permutation(23)
    got = list(pipeline.batches(arr, idx, 5))
    np.testing.assert_array_equal(np.concatenate([b for _, b in got]), arr[idx])
    # start (resume) gives the tail of the same stream, and to_device moves batches to the device.
    tail = list(pipeline.to_device(pipeline.batches(arr, idx, 5, start=10)))
    assert isinstance(tail[0][1], jax.Array)
    np.testing.assert_array_equal(np.concatenate([np.asarray(b) for _, b in tail]), arr[idx[10:]])


def test_batch_plan_cuts_at_chunks_and_checks_arguments():
    assert pipeline.batch_plan(10, 4, chunk_size=6) == [(0, 4), (4, 6), (6, 10)]
    assert pipeline.batch_plan(10, 4, start=6, chunk_size=6) == [(6, 10)]
    assert pipeline.batch_plan(9, 4) == [(0, 4), (4, 8), (8, 9)]
    with pytest.raises(DN2Error, match="start"):
        pipeline.batches(np.zeros((4, 2, 2), np.uint8), batch_size=2, start=5)
    with pytest.raises(DN2Error, match="indices must lie in"):
        pipeline.batches(np.zeros((4, 2, 2), np.uint8), [0, 4], 2)
    with pytest.raises(DN2Error, match="shard"):
        pipeline.shard_range(10, (2, 2))


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_process_shards_partition_the_rows(count):
    arr = np.arange(17 * 2 * 2, dtype=np.uint8).reshape(17, 2, 2)
    idx = np.random.default_rng(count).permutation(17)
    parts = [np.concatenate([p for p, _ in pipeline.batches(arr, idx, 3, shard=(i, count))] or [np.zeros(0, int)])
             for i in range(count)]
    assert np.array_equal(np.concatenate(parts), np.arange(17))  # disjoint, complete, in process order
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    lo, hi = pipeline.shard_range(17, (count - 1, count))
    assert parts[-1].tolist() == list(range(lo, hi))


def test_resumed_store_equals_an_uninterrupted_one(tmp_path):
    root = _folder(tmp_path / "f", per_class=9)
    ds = data.load_dataset(f"folder:{root}", "all")
    order = pipeline.order_by_shape(ds.images, np.arange(len(ds)))
    kw = dict(metadata=META, ids=order, labels=ds.labels[order], indices=order, chunk_size=4, batch_size=3,
              progress=False)
    whole = store.extract_to_store(tmp_path / "whole", ds.images, _mean_embed, **kw)
    calls = []

    def dies(batch):
        calls.append(len(batch))
        if len(calls) == 5:  # chunk 0 = batches (3, 1), chunk 1 = (3, 1): killed in chunk 2
            raise KeyboardInterrupt
        return _mean_embed(batch)

    with pytest.raises(KeyboardInterrupt):
        store.extract_to_store(tmp_path / "part", ds.images, dies, **kw)
    with pytest.raises(store.IncompleteStoreError, match="2 of 5 chunks"):
        store.open_store(tmp_path / "part")
    calls.clear()
    resumed = store.extract_to_store(tmp_path / "part", ds.images, lambda b: calls.append(len(b)) or _mean_embed(b),
                                     **kw)
    assert sum(calls) == len(ds) - 8  # only the rows of chunks 2.. were read again
    np.testing.assert_array_equal(resumed.embeddings(), whole.embeddings())
    np.testing.assert_array_equal(resumed.ids, order)
    eager = _eager(ds.paths)
    np.testing.assert_array_equal(whole.embeddings(), _mean_embed_rows([eager[i] for i in order]))


def _mean_embed_rows(images):
    return np.concatenate([_mean_embed(im[None]) for im in images])


def test_decode_failure_mid_stream_names_the_file_and_keeps_committed_chunks(tmp_path):
    root = _folder(tmp_path / "f", sizes=((6, 5),), per_class=6)
    bad = root / "c1" / "3.png"
    raw = bad.read_bytes()
    at = raw.index(b"IDAT") + 4
    bad.write_bytes(raw[:at] + bytes(len(raw) - at))  # the header reads, the pixel data is zeros
    ds = data.load_dataset(f"folder:{root}", "all")  # listing reads headers only: no error yet
    assert len(ds) == 12 and ds.skipped == ()
    with pytest.raises(DN2FileError, match=r"cannot decode image .*c1[/\\]3\.png"):
        store.extract_to_store(tmp_path / "s", ds.images, _mean_embed, metadata=META, chunk_size=4, batch_size=2,
                               progress=False)
    with pytest.raises(store.IncompleteStoreError, match="2 of 3 chunks"):  # rows 0..7 were committed
        store.open_store(tmp_path / "s")
    # With skipping, the file is found when the folder is listed: left out and reported, ids stay dense.
    data.clear_cache()
    kept = data.load_dataset(f"folder:{root}", "all", on_error="skip")
    assert len(kept) == 11 and [p for p, _ in kept.skipped] == [str(bad)] and str(bad) not in kept.paths
    st = FeatureExtractor(Detector(backbone="pixels")).to_store(tmp_path / "k", kept, np.arange(11))
    assert st.ids.tolist() == list(range(11))


def test_resuming_with_another_order_or_changed_files_is_refused(tmp_path):
    root = _folder(tmp_path / "f", sizes=((6, 5),), per_class=4)
    ds = data.load_dataset(f"folder:{root}", "all")
    extract = FeatureExtractor(Detector(backbone="pixels"))
    extract.to_store(tmp_path / "s", ds, np.arange(8), chunk_size=4)
    with pytest.raises(DN2Error, match="ids_sha256.*another source order"):
        extract.to_store(tmp_path / "s", ds, np.arange(8)[::-1], chunk_size=4)
    Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(root / "c0" / "9.png")  # a file added to the source
    data.clear_cache()
    grown = data.load_dataset(f"folder:{root}", "all")
    with pytest.raises(DN2Error, match=r"files: store has .*image files changed"):
        extract.to_store(tmp_path / "s", grown, np.arange(8), chunk_size=4)


def test_detector_streams_a_lazy_source_like_the_decoded_list(tmp_path):
    root = _folder(tmp_path / "f", sizes=((6, 5),), per_class=5)
    ds = data.load_dataset(f"folder:{root}", "all")
    det = Detector(backbone="pixels")
    np.testing.assert_array_equal(det.embed(ds.images, raw=True), det.embed(_eager(ds.paths), raw=True))


@pytest.mark.slow
def test_streaming_memory_does_not_grow_with_the_source(tmp_path):
    n, side = 600, 96  # 600 RGB images of 27 KiB: 16 MiB decoded in all
    folder = tmp_path / "big" / "c"
    folder.mkdir(parents=True)
    base = np.add.outer(np.arange(side), np.arange(side)).astype(np.uint8)
    for i in range(n):
        image = np.stack([base + np.uint8(i % 256), base, base], -1)
        Image.fromarray(image).save(folder / f"{i:04d}.png", compress_level=1)
    ds = data.load_dataset(f"folder:{tmp_path / 'big'}", "all")
    proc = psutil.Process()
    list(pipeline.batches(ds.images, batch_size=8, threads=2, prefetch=2))  # warm up allocator and threads
    before, peak, done = proc.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.002)

    t = threading.Thread(target=sample)
    t.start()
    total = 0
    for _, batch in pipeline.batches(ds.images, batch_size=8, threads=2, prefetch=2):
        total += batch.nbytes
    done.set()
    t.join()
    assert total == n * side * side * 3
    assert peak[0] - before < total / 4, (peak[0] - before, total)
