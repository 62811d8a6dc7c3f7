import asyncio, aiohttp, sys, json
URL="http://127.0.0.1:9500/v1/chat/completions"
async def one(s, key, model, stream, cut=None, extra=None):
    body={"model":model,"messages":[{"role":"user","content":"hello there"}],"stream":stream, "temperature":0.7, **(extra or {})}
    async with s.post(URL, json=body, headers={"Authorization":f"Bearer {key}"}) as r:
        if cut is not None:
            await asyncio.sleep(cut); return ("cut", r.status)
        t = await r.text()
        return (r.status, r.headers.get("x-frugal-route"), t[:160])
async def main():
    key, model, stream, n, cut = sys.argv[1], sys.argv[2], sys.argv[3]=="1", int(sys.argv[4]), (float(sys.argv[5]) if len(sys.argv)>5 and sys.argv[5] != "-" else None)
    extra = json.loads(sys.argv[6]) if len(sys.argv)>6 else None
    async with aiohttp.ClientSession() as s:
        rs = await asyncio.gather(*[one(s,key,model,stream,cut,extra) for _ in range(n)], return_exceptions=True)
        for r in rs: print(r)
asyncio.run(main())
