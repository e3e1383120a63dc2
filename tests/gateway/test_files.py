"""`/v1/files` through the SDK: upload checks (415, 400s, 413), list paging, content, delete."""

from __future__ import annotations

import aiohttp
import openai
import pytest

from .conftest import chat_line, jsonl, plan_only_config, poll, running

pytestmark = pytest.mark.asyncio(loop_scope="session")


async def test_upload_retrieve_content_delete(cfg):
    data = jsonl([chat_line("a")])
    async with running(cfg) as srv:
        client = srv.client()
        f = await client.files.create(file=("../../etc/passwd", data), purpose="batch")
        assert (await client.files.retrieve(f.id)).filename == "../../etc/passwd"
        stored = list((cfg.state_dir / "files").iterdir())
        assert [p.name for p in stored] == [f.id]  # stored under its id, never the user's name
        assert (await client.files.content(f.id)).content == data
        deleted = await client.files.delete(f.id)
        assert deleted.deleted and deleted.id == f.id
        with pytest.raises(openai.NotFoundError):
            await client.files.retrieve(f.id)
        assert not (cfg.state_dir / "files" / f.id).exists()


@pytest.mark.parametrize("payload,code", [
    (b"", "empty_file"),
    (b'{"a": "\xff\xfe"}\n', "invalid_encoding"),
    (b'{"a": "\xc3', "invalid_encoding"),  # truncated multi-byte sequence at the very end
])
async def test_upload_rejects_bad_content(cfg, payload, code):
    async with running(cfg) as srv:
        client = srv.client()
        with pytest.raises(openai.BadRequestError) as exc:
            await client.files.create(file=("x.jsonl", payload), purpose="batch")
        assert exc.value.code == code
        assert [f async for f in client.files.list()] == []
        assert list((cfg.state_dir / "files").iterdir()) == []


async def test_upload_form_errors(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        with pytest.raises(openai.BadRequestError) as exc:
            await client.files.create(file=("x.jsonl", b"{}\n"), purpose="nonsense")
        assert exc.value.param == "purpose"
        async with aiohttp.ClientSession() as http:
            form = aiohttp.FormData()
            form.add_field("purpose", "batch")
            async with http.post(f"{srv.url}/v1/files", data=form()) as r:
                # a form without a file part is urlencoded by aiohttp: not multipart at all
                assert r.status == 415
                assert (await r.json())["error"]["code"] == "unsupported_media_type"
            mp = aiohttp.MultipartWriter("form-data")
            mp.append("batch").set_content_disposition("form-data", name="purpose")
            async with http.post(f"{srv.url}/v1/files", data=mp) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "file"
            mp = aiohttp.MultipartWriter("form-data")
            mp.append(b"{}\n").set_content_disposition("form-data", name="file", filename="a")
            async with http.post(f"{srv.url}/v1/files", data=mp) as r:
                body = await r.json()
                assert r.status == 400 and body["error"]["param"] == "purpose"
            async with http.post(f"{srv.url}/v1/files", json={"purpose": "batch"}) as r:
                assert r.status == 415
            async with http.get(f"{srv.url}/v1/nothing") as r:
                body = await r.json()
                assert r.status == 404 and set(body["error"]) == {"message", "type", "param",
                                                                  "code"}
        assert list((cfg.state_dir / "files").iterdir()) == []


async def test_upload_too_large_is_413(tmp_path):
    cfg = plan_only_config(tmp_path, max_file_bytes=1000)
    async with running(cfg) as srv:
        client = srv.client()
        ok = await client.files.create(file=("ok.jsonl", b"x" * 1000), purpose="batch")
        assert ok.bytes == 1000
        with pytest.raises(openai.APIStatusError) as exc:
            await client.files.create(file=("big.jsonl", b"x" * 300_000), purpose="batch")
        assert exc.value.status_code == 413 and exc.value.code == "file_too_large"
        assert [p.name for p in (cfg.state_dir / "files").iterdir()] == [ok.id]


async def test_list_files_paging_order_purpose(cfg):
    async with running(cfg) as srv:
        client = srv.client()
        ids = [(await client.files.create(file=(f"{i}.jsonl", b"{}\n"), purpose="batch")).id
               for i in range(7)]
        other = await client.files.create(file=("u.txt", b"hello"), purpose="user_data")
        walked = [f.id async for f in client.files.list(limit=3, purpose="batch")]
        assert walked == ids[::-1]
        asc = [f.id async for f in client.files.list(limit=2, order="asc")]
        assert asc == ids + [other.id]
        page = await client.files.list(limit=3, order="asc")
        assert page.has_more and page.model_extra["first_id"] == ids[0]
        assert page.model_extra["last_id"] == ids[2]
        with pytest.raises(openai.BadRequestError):
            await client.files.list(limit=0)
        with pytest.raises(openai.NotFoundError):
            await client.files.list(after="file-doesnotexist")
        # an integer parameter sent empty is not one (the document types it integer): 400 on every
        # list, as schemathesis' negative cases expect; the SDK never sends one
        async with aiohttp.ClientSession() as http:
            for path in ("/v1/files", "/v1/batches"):
                async with http.get(f"{srv.url}{path}?limit=") as r:
                    assert r.status == 400, path
                    assert (await r.json())["error"]["param"] == "limit"


async def test_delete_input_of_live_batch_is_409(cfg):
    async with running(cfg) as srv:
        srv.executor.hold()
        client = srv.client()
        f = await client.files.create(file=("a.jsonl", jsonl([chat_line("a")])), purpose="batch")
        b = await client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                        completion_window="24h")
        await poll(client, b.id, lambda x: x.status == "in_progress")
        with pytest.raises(openai.ConflictError) as exc:
            await client.files.delete(f.id)
        assert exc.value.response.headers["x-should-retry"] == "false"
        srv.executor.release(1)
        await poll(client, b.id)
        assert (await client.files.delete(f.id)).deleted
