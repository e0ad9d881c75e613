import subprocess
import sys

from tandem.protocol.hashing import hash_block, hash_block_tokens


def test_hashes_chain_and_cover_only_full_blocks():
    ids = list(range(37))
    hashes = hash_block_tokens(ids, 16)
    assert len(hashes) == 2
    assert hashes[0] == hash_block(None, ids[:16])
    assert hashes[1] == hash_block(hashes[0], ids[16:32])


def test_equal_blocks_with_different_prefixes_differ():
    a = hash_block_tokens([1] * 16 + [5] * 16, 16)
    b = hash_block_tokens([2] * 16 + [5] * 16, 16)
    assert a[1] != b[1]
    assert hash_block_tokens([5] * 16, 16, extra_keys=("lora-1",)) != hash_block_tokens([5] * 16, 16)


def test_hashes_are_stable_across_processes_and_torch_free():
    code = (
        "import sys; from tandem.protocol.hashing import hash_block_tokens; "
        "print(hash_block_tokens(list(range(64)), 16)); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == str(hash_block_tokens(list(range(64)), 16))
    assert out[1] == "False"
