"""``--texts`` and ``--calib`` files: regular files, pipes, and clear errors for the rest."""

from __future__ import annotations

import os
import socket
import threading
from pathlib import Path

import pytest

from trtpipe.errors import InputError
from trtpipe.text import read_texts


def test_a_file_gives_its_lines_without_blanks(tmp_path: Path) -> None:
    file = tmp_path / "texts.txt"
    file.write_text("  first text \n\n second\n   \n", encoding="utf-8")
    assert read_texts(file) == ["first text", "second"]


def test_a_named_pipe_is_read_like_a_file(tmp_path: Path) -> None:
    """What ``--texts <(head -n 2 corpus.txt)`` hands over: a pipe, not a regular file."""
    fifo = tmp_path / "texts.fifo"
    os.mkfifo(fifo)

    def write() -> None:
        with open(fifo, "w", encoding="utf-8") as pipe:
            pipe.write("one sentence\nanother sentence\n")

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    try:
        assert read_texts(fifo) == ["one sentence", "another sentence"]
    finally:
        if writer.is_alive():  # nothing read the pipe: open it so that the writer returns
            with open(fifo, encoding="utf-8") as pipe:
                pipe.read()
        writer.join(timeout=10)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: d / "missing.txt", "does not exist"),
        (lambda d: d, "is a directory"),
        (lambda d: Path(os.devnull), "holds no text"),
    ],
)
def test_what_is_not_text_is_one_clear_error(tmp_path: Path, make, message: str) -> None:
    with pytest.raises(InputError, match=message):
        read_texts(make(tmp_path))


def test_bytes_that_are_not_utf8_are_named(tmp_path: Path) -> None:
    file = tmp_path / "latin1.txt"
    file.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(InputError, match="is not UTF-8 text"):
        read_texts(file)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    file = tmp_path / "locked.txt"
    file.write_text("secret\n")
    file.chmod(0)
    with pytest.raises(InputError, match="cannot read text file"):
        read_texts(file)


def test_a_path_that_cannot_be_opened_for_reading_is_named(tmp_path: Path) -> None:
    """A Unix socket exists but open() refuses it (ENXIO), even for root."""
    path = tmp_path / "server.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        with pytest.raises(InputError, match=r"cannot read text file .*server\.sock"):
            read_texts(path)
