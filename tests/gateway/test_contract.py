"""The rest of OpenAI's batch contract through the official SDK: `endpoint` checked at create, empty
list pages, engine rejections in OpenAI's error shape, binary uploads for purposes other than
`batch` (issue 18, section 3)."""

from __future__ import annotations

import openai
import pytest

from .conftest import chat_line, jsonl, poll, read_lines, running

pytestmark = pytest.mark.asyncio(loop_scope="session")
CHAT = "/v1/chat/completions"


async def test_create_refuses_an_endpoint_this_gateway_does_not_serve(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("a")])), purpose="batch")
        for endpoint in ("/v1/bogus", "/v1/moderations", "/v1/images/generations"):
            with pytest.raises(openai.BadRequestError) as exc:
                await client.batches.create(input_file_id=f.id, endpoint=endpoint,  # type: ignore[arg-type]
                                            completion_window="24h")
            assert exc.value.param == "endpoint" and exc.value.code == "unsupported_endpoint"
            assert exc.value.type == "invalid_request_error"
        assert [b async for b in client.batches.list()] == []  # nothing created


async def test_empty_and_multi_page_lists_with_the_sdk_pager(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        for page in (await client.batches.list(), await client.files.list()):
            assert page.data == [] and page.has_more is False
            # the spec types them as strings; the pager never reads them
            assert page.model_extra["first_id"] == "" and page.model_extra["last_id"] == ""
        assert [b async for b in client.batches.list()] == []
        assert [f async for f in client.files.list(limit=2)] == []
        ids = [(await client.files.create(file=(f"{i}.jsonl", jsonl([chat_line("a")])),
                                          purpose="batch")).id for i in range(5)]
        made = [(await client.batches.create(input_file_id=i, endpoint=CHAT,
                                             completion_window="24h")).id for i in ids]
        assert [b.id async for b in client.batches.list(limit=2)] == made[::-1]
        files = [f.id async for f in client.files.list(limit=2, order="asc", purpose="batch")]
        assert files == ids
        last = await client.batches.list(after=made[0])  # past the oldest: an empty page
        assert last.data == [] and not last.has_more and last.model_extra["last_id"] == ""


async def test_engine_rejection_is_written_in_openai_error_shape(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("in.jsonl", jsonl([chat_line("ok"),
                                                                chat_line("bad", text="FAIL")])),
                                      purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint=CHAT, completion_window="24h")
        done = await poll(client, b.id)
        (err,) = await read_lines(client, done.error_file_id)
        assert err["custom_id"] == "bad" and err["error"] is None
        assert err["response"]["status_code"] == 400
        # vLLM's body carries `"code": 400`, an integer; the spec's error object allows a string
        assert err["response"]["body"] == {"error": {
            "message": "simulated engine rejection", "type": "invalid_request_error",
            "param": None, "code": None}}


@pytest.mark.parametrize("purpose", ["vision", "user_data", "assistants", "evals"])
async def test_binary_upload_for_other_purposes(cfg, purpose):
    png = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe\xc3"  # not UTF-8, ends mid-sequence
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("pic.png", png), purpose=purpose)  # type: ignore[arg-type]
        assert f.purpose == purpose and f.bytes == len(png)
        assert (await client.files.content(f.id)).content == png
        with pytest.raises(openai.BadRequestError) as exc:  # batch input is still UTF-8 JSONL
            await client.files.create(file=("in.jsonl", png), purpose="batch")
        assert exc.value.code == "invalid_encoding"
        assert [x.id async for x in client.files.list()] == [f.id]


async def test_binary_upload_with_the_purpose_after_the_file(cfg):
    """The purpose part may follow the file part: the UTF-8 check is decided once it is read."""
    blob = b"\x00\xff\xfe binary"
    async with running(cfg) as srv:
        http = srv.client()._client
        for purpose, status in (("user_data", 200), ("batch", 400)):
            r = await http.post(f"{srv.url}/v1/files", files=[
                ("file", ("b.bin", blob, "application/octet-stream")),
                ("purpose", (None, purpose))])
            assert r.status_code == status, r.text
        assert len(list((cfg.state_dir / "files").iterdir())) == 1
