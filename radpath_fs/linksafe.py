"""A zarr LocalStore that writes and deletes nothing through a symbolic link (store.refuse_links).

Zarr writes each chunk and metadata file under the store's folder by path; a link planted at any
level (`tiles.zarr`, `tiles.zarr/<case>`, a chunk folder) would otherwise redirect those writes,
and a group rewrite's delete, outside the store. Reads are left alone.
"""

from __future__ import annotations

from zarr.storage import LocalStore

from radpath_fs.store import refuse_links


class LinkSafeLocalStore(LocalStore):
    def _check(self, key: str) -> None:
        # The zarr folder itself (`tiles.zarr`) is below the radpath store root: check it too.
        refuse_links(self.root.parent, f"{self.root.name}/{key}")

    async def set(self, key, value) -> None:
        self._check(key)
        return await super().set(key, value)

    async def set_if_not_exists(self, key, value) -> None:
        self._check(key)
        return await super().set_if_not_exists(key, value)

    async def delete(self, key) -> None:
        self._check(key)
        return await super().delete(key)

    async def delete_dir(self, prefix) -> None:
        self._check(prefix)
        return await super().delete_dir(prefix)

    def set_sync(self, key, value) -> None:
        self._check(key)
        return super().set_sync(key, value)

    def delete_sync(self, key) -> None:
        self._check(key)
        return super().delete_sync(key)
