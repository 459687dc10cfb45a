"""mongosh and the Node.js driver through modelgate (installed with `npm ci`)."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from bench.support.processes import ROOT, ProxyProcess

MONGOSH = ROOT / "node_modules" / ".bin" / "mongosh"
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    not MONGOSH.exists() or NODE is None,
    reason="node_modules/.bin/mongosh is missing: run `npm ci` at the repository root",
)


def _run(command: list[str], timeout: float = 60) -> str:
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.stdout


def _last_json(output: str):  # type: ignore[no-untyped-def]
    lines = [line for line in output.splitlines() if line.strip().startswith(("{", "["))]
    assert lines, output
    return json.loads(lines[-1])


MONGOSH_SCRIPT = """
db.people.insertOne({name: "ada", age: 36});
db.people.insertMany([{name: "alan", age: 41}, {name: "grace", age: 85}]);
const found = db.people.find({age: {$gt: 40}}, {_id: 0}).sort({age: 1}).toArray();
const total = db.people.aggregate([{$group: {_id: null, sum: {$sum: "$age"}}}]).toArray();
const hello = db.hello();
print(EJSON.stringify({
  found: found,
  sum: total[0].sum,
  count: db.people.countDocuments({}),
  msg: hello.msg,
}));
"""


def test_mongosh_crud_and_aggregate(proxy: ProxyProcess, db_name: str, direct) -> None:
    output = _run([str(MONGOSH), f"{proxy.uri}{db_name}", "--quiet", "--eval", MONGOSH_SCRIPT])
    result = _last_json(output)
    assert result["found"] == [{"name": "alan", "age": 41}, {"name": "grace", "age": 85}]
    assert result["sum"] == 36 + 41 + 85
    assert result["count"] == 3
    assert result["msg"] == "isdbgrid"
    assert direct[db_name].people.count_documents({}) == 3


NODE_SCRIPT = """
const { MongoClient } = require('mongodb');
(async () => {
  const client = new MongoClient(process.argv[1], { serverSelectionTimeoutMS: 5000 });
  try {
    await client.connect();
    const coll = client.db(process.argv[2]).collection('items');
    await coll.insertMany(Array.from({ length: 250 }, (_, i) => ({ i })));
    const cursor = coll.find({}, { batchSize: 50, sort: { i: 1 } });
    let seen = 0, last = -1, ordered = true;
    for await (const doc of cursor) {
      ordered = ordered && doc.i === last + 1;
      last = doc.i;
      seen++;
    }
    const session = client.startSession();
    try {
      await session.withTransaction(async () => {
        await coll.insertOne({ i: 1000, tx: true }, { session });
        await coll.updateOne({ i: 0 }, { $set: { touched: true } }, { session });
      });
    } finally { await session.endSession(); }
    const aborted = client.startSession();
    aborted.startTransaction();
    await coll.insertOne({ i: 2000, tx: 'aborted' }, { session: aborted });
    await aborted.abortTransaction();
    await aborted.endSession();
    console.log(JSON.stringify({
      seen, ordered,
      count: await coll.countDocuments({}),
      committed: await coll.countDocuments({ tx: true }),
      aborted: await coll.countDocuments({ tx: 'aborted' }),
      touched: await coll.countDocuments({ touched: true }),
    }));
  } finally { await client.close(); }
})().catch((err) => { console.error(err); process.exit(1); });
"""


def test_node_driver_batches_and_transactions(proxy: ProxyProcess, db_name: str, direct) -> None:
    assert NODE is not None
    output = _run([NODE, "-e", NODE_SCRIPT, proxy.uri, db_name])
    result = _last_json(output)
    assert result == {
        "seen": 250,
        "ordered": True,
        "count": 251,
        "committed": 1,
        "aborted": 0,
        "touched": 1,
    }
    assert direct[db_name].items.count_documents({"tx": True}) == 1
