-- `llmpulse trace`: user feedback on one call. Tenant '' = every tenant (admin keys); a tenant key is bound to its own.
SELECT ts, thumbs, rating, comment, user_id
FROM feedback FINAL
WHERE request_id = {request_id:String} AND ({tenant:String} = '' OR tenant = {tenant:String})
ORDER BY ts
