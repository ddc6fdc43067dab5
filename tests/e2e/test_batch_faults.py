"""`link fault` in a batch of the offline stack (issue 10): the simulated NIC's injected faults as a user sees them."""

import textwrap

KEY = "0x0102030405060708090a0b0c0d0e0f1011121314"
SETUP = """\
link add sim0 type simnic
link set sim0 up
addr add 192.0.2.1/24 dev sim0
"""
ADD = (f"state add src 192.0.2.1 dst 192.0.2.2 proto esp spi {{spi}} reqid 1 mode tunnel aead rfc4106(gcm(aes)) {KEY} "
       "128 offload packet dev sim0 dir out\n")


def batch(tmp_path, xfrm, text):
    (tmp_path / "b").write_text(text)
    return xfrm("-batch", "b", check=False)


def test_an_injected_add_failure_fails_the_add_with_its_errno_text_and_leaves_nothing(tmp_path, xfrm):
    rc, out, err = batch(tmp_path, xfrm, SETUP + "link fault sim0 state-add ETIMEDOUT\n" + ADD.format(spi="0x100"))
    assert rc == 2 and err.strip() == "Error: Device sim0 timed out programming the SA.", err
    rc, out, err = batch(tmp_path, xfrm, SETUP + "link fault sim0 state-add ENOSPC count 1\n"
                         + "ip xfrm state add src 192.0.2.1 dst 192.0.2.3 proto esp spi 0x99 reqid 1 mode tunnel "
                         + f"aead rfc4106(gcm(aes)) {KEY} 128\n"  # a software SA: no device command, no fault
                         + "state count\nlink show -s sim0\n")
    assert rc == 0 and "SAD count 1" in out and "SA count=0" in out, (out, err)


def test_a_vanished_nic_takes_its_sas_with_it_and_bad_fault_lines_are_refused(tmp_path, xfrm):
    rc, out, err = batch(tmp_path, xfrm, SETUP + ADD.format(spi="0x100") + "link fault sim0 vanish\nstate count\n"
                         + "link show\n")
    assert rc == 0 and "SAD count 0" in out and "sim0" not in out, (out, err)
    for line in ["link fault sim0 state-add EAGAIN", "link fault sim0 stall maybe", "link fault sim0 stats EIO count 0",
                 "link fault lo stall on", "link fault nope clear"]:
        rc, out, err = batch(tmp_path, xfrm, SETUP + line + "\n")
        assert rc == 1 and "Command failed" in err, (line, err)
