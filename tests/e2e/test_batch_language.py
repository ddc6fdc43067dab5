"""The `-batch` language as `ip -batch` reads it (iproute2 lib/utils.c getcmdline + makeargs): single and double
quotes group words, `#` ends a line, a backslash before the newline continues the command, an unterminated quote
stops the batch with "Unterminated quoted string"."""

import textwrap

KEY = "0x0102030405060708090a0b0c0d0e0f1011121314"


def run(tmp_path, xfrm, text, check=True):
    (tmp_path / "b").write_text(text)
    return xfrm("-batch", "b", check=check)


def test_quoted_algorithm_names_comments_and_continuations(tmp_path, xfrm):
    rc, out, err = run(tmp_path, xfrm, textwrap.dedent(f"""\
        # a comment line
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel \\
            aead 'rfc4106(gcm(aes))' {KEY} 128   # trailing comment
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x101 reqid 1 mode tunnel aead "rfc4106(gcm(aes))" {KEY} 128
        state count
        """))
    assert rc == 0, err
    assert out == "\t SAD count 2\n"


def test_a_hash_inside_quotes_still_ends_the_line_as_in_iproute2(tmp_path, xfrm):
    # getcmdline cuts at the first '#' before words are split, so the quote is left open.
    rc, out, err = run(tmp_path, xfrm, "state count '#'\n", check=False)
    assert rc != 0
    assert err.strip().splitlines()[-1] == "Unterminated quoted string"


def test_unterminated_quote_stops_the_batch_without_a_command_failed_line(tmp_path, xfrm):
    rc, out, err = run(tmp_path, xfrm, textwrap.dedent(f"""\
        state add src 192.0.2.1 dst 192.0.2.2 proto esp spi 0x100 reqid 1 mode tunnel aead 'rfc4106(gcm(aes)) {KEY} 128
        state count
        """), check=False)
    assert rc != 0
    assert err.strip().splitlines() == ["Unterminated quoted string"], err
    assert out == ""


def test_errors_name_the_last_physical_line_of_a_continued_command(tmp_path, xfrm):
    rc, out, err = run(tmp_path, xfrm, "state count\nlink add eth0 \\\n  type dummy\nlink add \\\n  eth0 \\\n"
                       "  type dummy\n", check=False)
    assert rc == 1
    assert err.strip().splitlines()[-1] == "Command failed b:6", err


def test_an_xfrm_argument_error_exits_255_at_once_as_ip_xfrm_does(tmp_path, xfrm):
    rc, out, err = run(tmp_path, xfrm, "state add src 192.0.2.1 \\\n  dst 192.0.2.2 proto esp spi 1 bogus\n"
                       "state count\n", check=False)
    assert rc == 255
    assert "Command failed" not in err and out == "", err


def test_a_missing_continuation_line_ends_the_batch_and_is_reported(tmp_path, xfrm):
    rc, out, err = run(tmp_path, xfrm, "state count\nstate flush \\\n", check=False)
    assert rc == 0
    assert out == "\t SAD count 0\n"
    assert "Missing continuation line" in err
