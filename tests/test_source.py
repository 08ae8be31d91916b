"""Loading sources: files, directories, stdin, and every way reading can fail."""

from __future__ import annotations

import pytest

from rlm_graph import SourceError
from rlm_graph.source import load_source, source_from_text


def test_files_are_joined_with_headers_and_offsets_map_back(tmp_path):
    (tmp_path / "a.txt").write_text("alpha line\nsecond line\n")
    (tmp_path / "b.txt").write_text("beta\n")
    source = load_source([tmp_path / "a.txt", tmp_path / "b.txt"])

    assert [f.name.split("/")[-1] for f in source.files] == ["a.txt", "b.txt"]
    for file, expected in zip(source.files, ["alpha line\nsecond line\n", "beta\n"], strict=True):
        assert source.text[file.start : file.end] == expected
    offset = source.text.index("second")
    location = source.locate(offset)
    assert location.file.name.endswith("a.txt")
    assert location.line == 2
    assert location.offset == len("alpha line\n")
    assert source.file_starts[0] == 0 and source.file_starts[1] < source.files[1].start


def test_directory_reads_text_files_recursively_and_skips_binary(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "deep.md").write_text("# deep\n")
    (tmp_path / "top.txt").write_text("top\n")
    (tmp_path / "image.bin").write_bytes(b"\x89PNG\x00\x00\x01")
    (tmp_path / ".hidden").write_text("secret\n")
    source = load_source([tmp_path])

    names = sorted(f.name.split("/")[-1] for f in source.files)
    assert names == ["deep.md", "top.txt"]


def test_digest_depends_on_content():
    assert source_from_text("one").digest != source_from_text("two").digest
    assert source_from_text("one").digest == source_from_text("one").digest


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: None, "No such file or directory"),
        (lambda p: p.write_text(""), "is empty"),
        (lambda p: p.write_bytes(b"ab\x00cd"), "looks binary (NUL byte at offset 2)"),
        (lambda p: p.write_bytes(b"caf\xe9 au lait"), "byte 0xe9 at offset 3"),
    ],
    ids=["missing", "empty", "binary", "bad-utf8"],
)
def test_unreadable_files_give_one_clear_error(tmp_path, setup, message):
    path = tmp_path / "input.txt"
    setup(path)
    with pytest.raises(SourceError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_source([path])


def test_invalid_utf8_suggests_encoding_and_latin1_reads_it(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes(b"caf\xe9 au lait")
    with pytest.raises(SourceError, match="--encoding"):
        load_source([path])
    assert "café" in load_source([path], encoding="latin-1").text


def test_directory_without_text_files_is_an_error(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    with pytest.raises(SourceError, match="holds no text files"):
        load_source([tmp_path])


def test_stdin_dash_reads_given_text():
    source = load_source(["-"], stdin_text="from a pipe\n")
    assert source.files[0].name == "<stdin>"
    assert "from a pipe" in source.text
    with pytest.raises(SourceError, match="stdin is empty"):
        load_source(["-"], stdin_text="  \n")


def test_a_directory_walk_does_not_follow_links_out_of_the_directory(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("a secret outside the folder")
    folder = tmp_path / "docs"
    folder.mkdir()
    (folder / "a.txt").write_text("inside text")
    (folder / "link.txt").symlink_to(outside)
    (folder / "inner.txt").symlink_to(folder / "a.txt")

    source = load_source([str(folder)])

    assert "secret" not in source.text
    # A link inside the folder is followed (and read once with its target).
    assert [f.name.rsplit("/", 1)[-1] for f in source.files] == ["a.txt"]
